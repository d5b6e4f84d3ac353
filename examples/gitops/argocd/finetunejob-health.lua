-- Argo CD health check for kubetune.dev/FineTuneJob.
-- Installed into argocd-cm as resource.customizations.health.kubetune.dev_FineTuneJob
-- (see kustomization.yaml beside this file). Read from the conditions (the operator's source of
-- truth; status.phase is derived from them):
--   Ready -> Healthy (complete, and served when spec.serving asks for it);
--   Failed, Cancelled or Stalled -> Degraded; Suspended -> Suspended;
--   anything else (Pending, Queued, Running, complete but not served yet, a spec the operator
--   has not seen yet) -> Progressing.
local hs = {}
if obj.status == nil or obj.status.conditions == nil then
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
local true_conditions = {}
for _, condition in ipairs(status.conditions) do
  if condition.status == "True" then
    true_conditions[condition.type] = condition
  end
end
local function said(condition, default)
  return (condition.reason or default) .. ": " .. (condition.message or "")
end
for _, kind in ipairs({"Stalled", "Failed", "Cancelled"}) do
  if true_conditions[kind] ~= nil then
    hs.status = "Degraded"
    hs.message = said(true_conditions[kind], kind)
    return hs
  end
end
if true_conditions["Ready"] ~= nil then
  hs.status = "Healthy"
  hs.message = true_conditions["Ready"].message or "Fine-tuning succeeded"
elseif true_conditions["Suspended"] ~= nil then
  hs.status = "Suspended"
  hs.message = true_conditions["Suspended"].message or "Suspended (spec.suspend is true)"
else
  hs.status = "Progressing"
  local detail = status.phase or "Pending"
  if true_conditions["Complete"] ~= nil then
    for _, condition in ipairs(status.conditions) do
      if condition.type == "Ready" then
        detail = "Succeeded, not ready: " .. said(condition, "NotReady")
      end
    end
  end
  if status.stage ~= nil then
    detail = detail .. " (" .. status.stage .. ")"
  end
  if status.progress ~= nil and status.progress.percent ~= nil then
    detail = detail .. string.format(" %.0f%%", status.progress.percent)
  end
  hs.message = detail
end
return hs
