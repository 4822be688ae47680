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

{{/* The model volume (named "model"). */}}
{{- define "caravan.modelVolume" -}}
- name: model
{{- $v := .Values.model.volume }}
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
{{- if and (eq $v.model.volume.type "pvc") (empty $v.model.volume.pvc.claimName) }}
{{- fail "model.volume.type pvc needs model.volume.pvc.claimName" }}
{{- end }}
{{- $engine := $v.engine }}
{{- if and (not (kindIs "invalid" $engine.maxBatchSize)) (not (kindIs "invalid" $engine.maxNumBatchedTokens)) }}
{{- if lt (int $engine.maxNumBatchedTokens) (int $engine.maxBatchSize) }}
{{- fail (printf "engine.maxNumBatchedTokens (%d) must be at least engine.maxBatchSize (%d): every running sequence decodes one token per step" (int $engine.maxNumBatchedTokens) (int $engine.maxBatchSize)) }}
{{- end }}
{{- end }}
{{- end }}
