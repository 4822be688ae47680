{{/* Names, labels and the pieces shared by several templates. */}}

{{- define "caravan.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: "<release>-<chart>", or "<release>" when the release name
already contains the chart name.
*/}}
{{- define "caravan.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Component names. StatefulSet names stay within 52 characters so that their pods'
controller-revision-hash label (name plus an 11-character suffix) fits in 63. */}}
{{- define "caravan.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "caravan.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "caravan.worker.fullname" -}}
{{- printf "%s-worker" (include "caravan.fullname" .) | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- define "caravan.worker.headless" -}}
{{- printf "%s-worker-headless" (include "caravan.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "caravan.etcd.fullname" -}}
{{- printf "%s-etcd" (include "caravan.fullname" .) | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- define "caravan.etcd.headless" -}}
{{- printf "%s-etcd-headless" (include "caravan.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "caravan.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "caravan.labels" -}}
helm.sh/chart: {{ include "caravan.chart" . }}
{{ include "caravan.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: caravan
{{- end }}

{{- define "caravan.selectorLabels" -}}
app.kubernetes.io/name: {{ include "caravan.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels and selector labels of one component: include with (list $ "worker"). */}}
{{- define "caravan.componentLabels" -}}
{{ include "caravan.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}
{{- define "caravan.componentSelectorLabels" -}}
{{ include "caravan.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "caravan.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "caravan.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "caravan.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* etcd client URLs, comma-separated: every member of the bundled etcd by its stable name, or
etcd.endpoints. */}}
{{- define "caravan.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- $name := include "caravan.etcd.fullname" . }}
{{- $host := printf "%s.%s.svc.%s" (include "caravan.etcd.headless" .) .Release.Namespace .Values.clusterDomain }}
{{- $urls := list }}
{{- range $i := until (int .Values.etcd.replicaCount) }}
{{- $urls = append $urls (printf "http://%s-%d.%s:%d" $name $i $host (int $.Values.etcd.ports.client)) }}
{{- end }}
{{- join "," $urls }}
{{- else }}
{{- join "," .Values.etcd.endpoints }}
{{- end }}
{{- end }}

{{/* etcd flags of the coordinator and the workers (registration.mode etcd). */}}
{{- define "caravan.etcdArgs" -}}
{{- if eq .Values.registration.mode "etcd" -}}
- {{ printf "--etcd-endpoints=%s" (include "caravan.etcdEndpoints" .) | quote }}
{{- with .Values.etcd.prefix }}
- {{ printf "--etcd-prefix=%s" . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The worker's device: workers.device, else cuda:0 with GPUs and cpu without. */}}
{{- define "caravan.worker.device" -}}
{{- if .Values.workers.device }}
{{- .Values.workers.device }}
{{- else if gt (int .Values.workers.gpu.count) 0 }}
{{- "cuda:0" }}
{{- else }}
{{- "cpu" }}
{{- end }}
{{- end }}

{{/* A flag value as text: whole numbers without an exponent (Helm reads YAML numbers as
floats, which would print 1048576 as 1.048576e+06). */}}
{{- define "caravan.flagValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* The model volume (named "model"); none when the checkpoint is baked into the image. */}}
{{- define "caravan.modelVolume" -}}
{{- $v := .Values.model.volume }}
{{- if ne $v.type "image" }}
- name: model
{{- if eq $v.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $v.pvc.claimName | quote }}
    readOnly: true
{{- else if eq $v.type "hostPath" }}
  hostPath:
    path: {{ $v.hostPath.path | quote }}
    {{- with $v.hostPath.type }}
    type: {{ . | quote }}
    {{- end }}
{{- else if eq $v.type "emptyDir" }}
  emptyDir:
    {{- with $v.emptyDir.sizeLimit }}
    sizeLimit: {{ . | quote }}
    {{- else }} {}
    {{- end }}
{{- else }}
{{- toYaml $v.custom | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}

{{/* The model volume's mount at /models (read-only); none for a checkpoint in the image, which
lies at /models/<model.path> there. */}}
{{- define "caravan.modelMount" -}}
{{- if ne .Values.model.volume.type "image" }}
- name: model
  mountPath: /models
  readOnly: true
{{- end }}
{{- end }}

{{/* A Kubernetes quantity ("1Gi", "1024Mi", "2G", "1.5Gi", 1073741824) in bytes; the text
itself when it is not one of these forms, so that two can still be compared. */}}
{{- define "caravan.quantityBytes" -}}
{{- $q := toString . }}
{{- $number := regexFind "^[0-9]+([.][0-9]+)?" $q }}
{{- $suffix := trimPrefix $number $q }}
{{- $units := dict "" 1.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 }}
{{- if and $number (hasKey $units $suffix) }}
{{- mulf (float64 $number) (get $units $suffix) }}
{{- else }}
{{- $q }}
{{- end }}
{{- end }}

{{/* Environment shared by the Caravan containers: the pod's identity and IP (the workers
advertise it to their peers), log settings, the OpenTelemetry resource. */}}
{{- define "caravan.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: HOME
  value: /tmp
- name: RUST_LOG
  value: {{ .Values.logging.level | quote }}
{{- if .Values.tracing.otlpEndpoint }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME),service.instance.id=$(POD_NAME)"
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Flags shared by caravan-coordinator and caravan-worker: logs and tracing. */}}
{{- define "caravan.commonArgs" -}}
{{- if eq .Values.logging.format "json" }}
- --log-format=json
{{- end }}
{{- with .Values.tracing.otlpEndpoint }}
- {{ printf "--otlp-endpoint=%s" . | quote }}
{{- end }}
{{- end }}

{{/* Pod anti-affinity of a component against its own replicas: include with
(list $ "worker" "soft"). */}}
{{- define "caravan.antiAffinity" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $mode := index . 2 }}
{{- if eq $mode "soft" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "caravan.componentSelectorLabels" (list $root $component) | nindent 12 }}
{{- else if eq $mode "hard" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "caravan.componentSelectorLabels" (list $root $component) | nindent 10 }}
{{- end }}
{{- end }}

{{/* Whether the pods talk to etcd over TLS (an external etcd, etcd.tls.secretName). */}}
{{- define "caravan.etcdTls" -}}
{{- if and (eq .Values.registration.mode "etcd") .Values.etcd.tls.secretName }}true{{ end }}
{{- end }}

{{/* Flags of mutual TLS (tls.secretName) and of TLS to etcd, for the coordinator and the
workers, read from the Secrets that caravan.tlsVolumes mounts. */}}
{{- define "caravan.tlsArgs" -}}
{{- if .Values.tls.secretName }}
- --tls-cert=/etc/caravan/tls/tls.crt
- --tls-key=/etc/caravan/tls/tls.key
- --tls-ca=/etc/caravan/tls/ca.crt
- {{ printf "--tls-server-name=%s" .Values.tls.serverName | quote }}
{{- end }}
{{- if include "caravan.etcdTls" . }}
- --etcd-cacert=/etc/caravan/etcd-tls/ca.crt
- --etcd-cert=/etc/caravan/etcd-tls/tls.crt
- --etcd-key=/etc/caravan/etcd-tls/tls.key
{{- end }}
{{- end }}

{{/* The volume mounts behind caravan.tlsArgs. */}}
{{- define "caravan.tlsMounts" -}}
{{- if .Values.tls.secretName }}
- name: tls
  mountPath: /etc/caravan/tls
  readOnly: true
{{- end }}
{{- if include "caravan.etcdTls" . }}
- name: etcd-tls
  mountPath: /etc/caravan/etcd-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* The volumes behind caravan.tlsMounts: each Secret's ca.crt, tls.crt and tls.key. */}}
{{- define "caravan.tlsVolumes" -}}
{{- $secrets := dict }}
{{- with .Values.tls.secretName }}
{{- $_ := set $secrets "tls" . }}
{{- end }}
{{- if include "caravan.etcdTls" . }}
{{- $_ := set $secrets "etcd-tls" .Values.etcd.tls.secretName }}
{{- end }}
{{- range $volume, $secret := $secrets }}
- name: {{ $volume }}
  secret:
    secretName: {{ $secret | quote }}
    items:
      - key: ca.crt
        path: ca.crt
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}

{{/* Settings no schema can express; a broken combination fails the render with the reason. */}}
{{- define "caravan.validate" -}}
{{- $v := .Values }}
{{- if and (eq $v.registration.mode "direct") (ne (int $v.coordinator.replicaCount) 1) }}
{{- fail (printf "registration.mode direct needs coordinator.replicaCount 1 (got %d): workers register with one coordinator; use registration.mode etcd for standby coordinators" (int $v.coordinator.replicaCount)) }}
{{- end }}
{{- if and (eq $v.registration.mode "etcd") (not $v.etcd.enabled) (empty $v.etcd.endpoints) }}
{{- fail "registration.mode etcd with etcd.enabled false needs etcd.endpoints (the external etcd's client URLs)" }}
{{- end }}
{{- if and $v.etcd.enabled $v.etcd.tls.secretName }}
{{- fail "etcd.tls.secretName is for an external etcd (etcd.enabled false): the chart's own etcd serves plaintext on the release's network" }}
{{- end }}
{{- if not $v.etcd.enabled }}
{{- range $v.etcd.endpoints }}
{{- if and (hasPrefix "https://" .) (not $v.etcd.tls.secretName) }}
{{- fail (printf "etcd endpoint %s is https:// but etcd.tls.secretName is empty: the pods need etcd's CA (ca.crt) and a client certificate" .) }}
{{- end }}
{{- if and (hasPrefix "http://" .) $v.etcd.tls.secretName }}
{{- fail (printf "etcd endpoint %s is http:// but etcd.tls.secretName is set: TLS to etcd needs https:// endpoints" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $v.etcd.enabled (not $v.etcd.persistence.enabled) (gt (int $v.etcd.replicaCount) 1) }}
{{- fail "etcd.persistence.enabled false works only with etcd.replicaCount 1: a member restarted without its data cannot rejoin the cluster" }}
{{- end }}
{{- $grace := $v.coordinator.terminationGracePeriodSeconds }}
{{- if and (not (kindIs "invalid" $grace)) (le (int $grace) (int $v.coordinator.drainTimeoutSeconds)) }}
{{- fail (printf "coordinator.terminationGracePeriodSeconds (%d) must exceed coordinator.drainTimeoutSeconds (%d): the preStop drain runs inside the grace period" (int $grace) (int $v.coordinator.drainTimeoutSeconds)) }}
{{- end }}
{{- $device := include "caravan.worker.device" . }}
{{- if and (hasPrefix "cuda" $device) (eq (int $v.workers.gpu.count) 0) }}
{{- fail (printf "workers.device %s needs workers.gpu.count of at least 1: a pod without GPUs sees none" $device) }}
{{- end }}
{{- if and $v.engine.quantization (ne $device "cpu") }}
{{- fail (printf "engine.quantization %s runs on CPU workers only for now, not on workers.device %s" $v.engine.quantization $device) }}
{{- end }}
{{- if and (eq $device "cpu") (gt (int $v.workers.gpu.count) 0) }}
{{- fail "workers.device cpu with workers.gpu.count > 0 would reserve GPUs and leave them idle" }}
{{- end }}
{{- if and (eq $v.model.volume.type "custom") (empty $v.model.volume.custom) }}
{{- fail "model.volume.type custom needs model.volume.custom (a volume source such as {nfs: {...}})" }}
{{- end }}
{{- if not $v.model.volume.type }}
{{- fail "model.volume.type is not set: say where the checkpoint lives (it is mounted read-only at /models, and model.path is the folder under it): pvc (an existing PersistentVolumeClaim that holds it, model.volume.pvc.claimName), hostPath (model.volume.hostPath.path, the same folder on every node), image (baked into the image at /models/<model.path>), emptyDir (filled by workers.extraInitContainers) or custom (model.volume.custom)" }}
{{- end }}
{{- if and (eq $v.model.volume.type "pvc") (empty $v.model.volume.pvc.claimName) }}
{{- fail "model.volume.type pvc needs model.volume.pvc.claimName: the name of an existing PersistentVolumeClaim in the release's namespace that holds the checkpoint" }}
{{- end }}
{{- include "caravan.validateCluster" . }}
{{- $engine := $v.engine }}
{{- if and (not (kindIs "invalid" $engine.maxBatchSize)) (not (kindIs "invalid" $engine.maxNumBatchedTokens)) }}
{{- if lt (int $engine.maxNumBatchedTokens) (int $engine.maxBatchSize) }}
{{- fail (printf "engine.maxNumBatchedTokens (%d) must be at least engine.maxBatchSize (%d): every running sequence decodes one token per step" (int $engine.maxNumBatchedTokens) (int $engine.maxBatchSize)) }}
{{- end }}
{{- end }}
{{- end }}


{{/* Checks against what the cluster holds and serves, where Helm can see it (install, upgrade,
`helm template --dry-run=server`; plain `helm template` sees no cluster: lookups return nothing
and only the API versions given with --api-versions exist). */}}
{{- define "caravan.validateCluster" -}}
{{- $v := .Values }}
{{- if and $v.metrics.serviceMonitor.enabled (not (or (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1"))) }}
{{- fail "metrics.serviceMonitor.enabled needs the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1), which this cluster does not serve: install the Prometheus Operator or its CRDs first (e.g. the kube-prometheus-stack chart), or leave metrics.serviceMonitor.enabled false and scrape the pods by their prometheus.io annotations (metrics.podAnnotations). With helm template, pass --api-versions monitoring.coreos.com/v1/ServiceMonitor" }}
{{- end }}
{{- if and $v.workers.leaderWorkerSet.enabled (not (or (.Capabilities.APIVersions.Has "leaderworkerset.x-k8s.io/v1/LeaderWorkerSet") (.Capabilities.APIVersions.Has "leaderworkerset.x-k8s.io/v1"))) }}
{{- fail "workers.leaderWorkerSet.enabled needs the LeaderWorkerSet API (leaderworkerset.x-k8s.io/v1), which this cluster does not serve: install the LWS controller first (https://lws.sigs.k8s.io/docs/installation/), or leave workers.leaderWorkerSet.enabled false for a StatefulSet of workers. With helm template, pass --api-versions leaderworkerset.x-k8s.io/v1/LeaderWorkerSet" }}
{{- end }}
{{- /* The model's claim must exist: without it every pod stays Pending. Listed rather than
fetched by name, because a claim that is not found and a cluster that is not there look alike
to a lookup by name. */}}
{{- if eq $v.model.volume.type "pvc" }}
{{- $claims := lookup "v1" "PersistentVolumeClaim" .Release.Namespace "" }}
{{- if hasKey $claims "items" }}
{{- $found := false }}
{{- range $claims.items }}
{{- if eq .metadata.name $v.model.volume.pvc.claimName }}
{{- $found = true }}
{{- end }}
{{- end }}
{{- if not $found }}
{{- fail (printf "model.volume.pvc.claimName %s: no PersistentVolumeClaim of that name in namespace %s; create it and copy the checkpoint onto it first (docs/KUBERNETES.md, \"The model volume\"), or choose another model.volume.type" $v.model.volume.pvc.claimName .Release.Namespace) }}
{{- end }}
{{- end }}
{{- end }}
{{- include "caravan.validateEtcdClaims" . }}
{{- end }}

{{/* Kubernetes refuses any change to an existing StatefulSet's volumeClaimTemplates, and Helm
would then leave the release failed half-way; refuse such an upgrade before it starts. */}}
{{- define "caravan.validateEtcdClaims" -}}
{{- $p := .Values.etcd.persistence }}
{{- $name := include "caravan.etcd.fullname" . }}
{{- $sts := dict }}
{{- if .Values.etcd.enabled }}
{{- $sts = lookup "apps/v1" "StatefulSet" .Release.Namespace $name }}
{{- end }}
{{- if $sts }}
{{- $claim := dict }}
{{- range (default list $sts.spec.volumeClaimTemplates) }}
{{- if eq .metadata.name "data" }}
{{- $claim = . }}
{{- end }}
{{- end }}
{{- $changes := list }}
{{- if and $claim (not $p.enabled) }}
{{- $changes = append $changes "etcd.persistence.enabled false (the members keep their data on claims)" }}
{{- else if and (not $claim) $p.enabled }}
{{- $changes = append $changes "etcd.persistence.enabled true (the members keep their data in emptyDir volumes)" }}
{{- else if $claim }}
{{- $size := $claim.spec.resources.requests.storage }}
{{- if ne (include "caravan.quantityBytes" $size) (include "caravan.quantityBytes" $p.size) }}
{{- $changes = append $changes (printf "etcd.persistence.size %v (the claims ask for %v)" $p.size $size) }}
{{- end }}
{{- $class := default "" $claim.spec.storageClassName }}
{{- if ne $class $p.storageClass }}
{{- $changes = append $changes (printf "etcd.persistence.storageClass %q (the claims use %q)" $p.storageClass $class) }}
{{- end }}
{{- if ne (toJson $claim.spec.accessModes) (toJson $p.accessModes) }}
{{- $changes = append $changes (printf "etcd.persistence.accessModes %s (the claims have %s)" (toJson $p.accessModes) (toJson $claim.spec.accessModes)) }}
{{- end }}
{{- end }}
{{- if $changes }}
{{- fail (printf "%s: Kubernetes forbids changing the volume claims of the existing StatefulSet %s, so this upgrade would fail half-way and leave the release failed. Keep the installed values, or follow \"Changing etcd's volumes\" in docs/KUBERNETES.md" (join "; " $changes) $name) }}
{{- end }}
{{- end }}
{{- end }}
