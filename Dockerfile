# kubetune operator image: the Kopf operator only (no torch), small and non-root.
#   docker build -t ghcr.io/kubetune/operator:0.1.0 .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer_image/kubetune_trainer/ trainer_image/kubetune_trainer/
# Versions are the ranges pinned in pyproject.toml (one source of truth), not repeated here.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --prefix=/install ".[operator]"

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="Kubernetes operator for FineTuneJob (kubetune.dev)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /install /usr/local
# A fixed non-root UID so runAsNonRoot can be verified by the kubelet.
USER 65532:65532
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 8080 9090
ENTRYPOINT ["kubetune-operator"]
