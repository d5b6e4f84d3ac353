-- Argo CD health check for kubetune.dev/FineTuneJob.
-- Installed into argocd-cm as resource.customizations.health.kubetune.dev_FineTuneJob
-- (see kustomization.yaml beside this file). Phases map to Argo CD health as:
--   Succeeded -> Healthy; Failed, Cancelled or Stalled -> Degraded; Suspended -> Suspended;
--   Pending, Queued, Running, or a spec the operator has not seen yet -> Progressing.
local hs = {}
if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up this FineTuneJob"
  return hs
end
local status = obj.status
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Stalled" and condition.status == "True" then
      hs.status = "Degraded"
      hs.message = (condition.reason or "Stalled") .. ": " .. (condition.message or "")
      return hs
    end
  end
end
local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = status.message or "Fine-tuning succeeded"
elseif phase == "Failed" or phase == "Cancelled" then
  hs.status = "Degraded"
  hs.message = (status.reason or phase) .. ": " .. (status.message or "")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = status.message or "Suspended (spec.suspend is true)"
else
  hs.status = "Progressing"
  local detail = phase
  if status.stage ~= nil then
    detail = detail .. " (" .. status.stage .. ")"
  end
  if status.progress ~= nil and status.progress.percent ~= nil then
    detail = detail .. string.format(" %.0f%%", status.progress.percent)
  end
  hs.message = detail
end
return hs
