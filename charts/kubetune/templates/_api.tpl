{{/*
Names and labels of the OpenAI-compatible API server (api-*.yaml). Its pods carry
app.kubernetes.io/component: api, so the operator's selectors never match them.
*/}}

{{/* <fullname>-api: the API server's Deployment, Service, ServiceAccount and ConfigMap. */}}
{{- define "kubetune.api.fullname" -}}
{{- printf "%s-api" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the API server's pods (immutable in a Deployment selector). */}}
{{- define "kubetune.api.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/component: api
{{- end }}

{{/* Labels on every resource of the API server. */}}
{{- define "kubetune.api.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.api.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* The Secret with the API server's own S3 keys: its own value, else the trainers' default. */}}
{{- define "kubetune.api.credentialsSecret" -}}
{{- default .Values.trainer.storage.credentialsSecretName .Values.apiServer.storage.credentialsSecretName }}
{{- end }}

{{/* Labels of the kubetune-user ClusterRole (user-rbac.yaml), which belongs to neither. */}}
{{- define "kubetune.userRole.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/component: user-role
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}
