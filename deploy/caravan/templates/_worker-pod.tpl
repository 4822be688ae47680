{{/* The worker pod template, shared by the StatefulSet and the LeaderWorkerSet variant. */}}
{{- define "caravan.worker.podTemplate" -}}
{{- $w := .Values.workers }}
{{- $device := include "caravan.worker.device" . -}}
metadata:
  labels:
    {{- include "caravan.componentLabels" (list . "worker") | nindent 4 }}
    {{- with $w.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $w.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  serviceAccountName: {{ include "caravan.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automount }}
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ $w.terminationGracePeriodSeconds }}
  {{- with $w.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  {{- with .Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $w.affinity }}
  affinity:
    {{- toYaml $w.affinity | nindent 4 }}
  {{- else if ne $w.podAntiAffinity "none" }}
  affinity:
    {{- include "caravan.antiAffinity" (list . "worker" $w.podAntiAffinity) | nindent 4 }}
  {{- end }}
  {{- if or $w.spread.enabled $w.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- if $w.spread.enabled }}
    - maxSkew: {{ $w.spread.maxSkew }}
      topologyKey: {{ $w.spread.topologyKey }}
      whenUnsatisfiable: {{ $w.spread.whenUnsatisfiable }}
      {{- if not (kindIs "invalid" $w.spread.minDomains) }}
      minDomains: {{ $w.spread.minDomains }}
      {{- end }}
      labelSelector:
        matchLabels:
          {{- include "caravan.componentSelectorLabels" (list . "worker") | nindent 10 }}
    {{- end }}
    {{- with $w.topologySpreadConstraints }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- with $w.extraInitContainers }}
  initContainers:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: worker
      image: {{ include "caravan.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      # The image's entrypoint (tini) stays PID 1 and forwards signals.
      args:
        - caravan-worker
        {{- if eq .Values.registration.mode "etcd" }}
        {{- include "caravan.etcdArgs" . | nindent 8 }}
        {{- else }}
        - --coordinator={{ if .Values.tls.secretName }}https{{ else }}http{{ end }}://{{ printf "%s-registration" (include "caravan.coordinator.fullname" .) | trunc 63 | trimSuffix "-" }}:{{ .Values.coordinator.ports.grpc }}
        {{- end }}
        - --listen=0.0.0.0:{{ $w.ports.grpc }}
        - --ring-addr=0.0.0.0:{{ $w.ports.ring }}
        # The address the coordinator and the other ranks reach this worker by.
        - --advertise-host=$(POD_IP)
        - {{ printf "--device=%s" $device | quote }}
        {{- with include "caravan.commonArgs" . | trim }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with include "caravan.tlsArgs" . | trim }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with $w.extraArgs }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      env:
        {{- include "caravan.commonEnv" . | nindent 8 }}
        {{- with $w.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ $w.ports.grpc }}
          protocol: TCP
        - name: ring
          containerPort: {{ $w.ports.ring }}
          protocol: TCP
      # grpc.health.v1.Health on the worker's gRPC port (gRPC probes take a port number only).
      # With mutual TLS the port wants a client certificate, which kubelet's gRPC probe cannot
      # present: the probes then check that the port accepts connections.
      readinessProbe:
        {{- if .Values.tls.secretName }}
        tcpSocket:
          port: {{ $w.ports.grpc }}
        {{- else }}
        grpc:
          port: {{ $w.ports.grpc }}
          {{- with $w.readinessProbe.service }}
          service: {{ . | quote }}
          {{- end }}
        {{- end }}
        {{- toYaml (omit $w.readinessProbe "service") | nindent 8 }}
      livenessProbe:
        {{- if .Values.tls.secretName }}
        tcpSocket:
          port: {{ $w.ports.grpc }}
        {{- else }}
        grpc:
          port: {{ $w.ports.grpc }}
          {{- with $w.livenessProbe.service }}
          service: {{ . | quote }}
          {{- end }}
        {{- end }}
        {{- toYaml (omit $w.livenessProbe "service") | nindent 8 }}
      {{- $resources := deepCopy (default dict $w.resources) }}
      {{- if gt (int $w.gpu.count) 0 }}
      {{- $gpus := dict $w.gpu.resourceName (int $w.gpu.count) }}
      {{- $_ := set $resources "limits" (merge (default dict $resources.limits) $gpus) }}
      {{- $_ := set $resources "requests" (merge (default dict $resources.requests) $gpus) }}
      {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        {{- with include "caravan.modelMount" . | trim }}
        {{- . | nindent 8 }}
        {{- end }}
        - name: dshm
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
        {{- with include "caravan.tlsMounts" . | trim }}
        {{- . | nindent 8 }}
        {{- end }}
  volumes:
    {{- with include "caravan.modelVolume" . | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    - name: dshm
      emptyDir:
        medium: Memory
        {{- with $w.shmSize }}
        sizeLimit: {{ . | quote }}
        {{- end }}
    - name: tmp
      emptyDir: {}
    {{- with include "caravan.tlsVolumes" . | trim }}
    {{- . | nindent 4 }}
    {{- end }}
{{- end }}
