{{/* The edge/cloud runtime: one container, Service and env for both tiers. */}}

{{/* Call with (dict "ctx" $ "tier" "edge"|"cloud" "values" .Values.edgeRuntime|cloudRuntime "nodeIdField" "spec.nodeName"|"metadata.name"). */}}
{{- define "cnei.runtimeContainer" -}}
{{- $r := .ctx.Values.runtime }}
{{- include "cnei.nodeTlsCheck" .ctx }}
- name: runtime
  {{- include "cnei.container" .ctx | trim | nindent 2 }}
  args: ["services.edge_runtime"]
  env:
    {{- include "cnei.telemetryEnv" .ctx | trim | nindent 4 }}
    - name: CNEI_RUNTIME_NODE_ID
      valueFrom:
        fieldRef:
          fieldPath: {{ .nodeIdField }}
    - name: CNEI_RUNTIME_TIER
      value: {{ .tier | quote }}
    - name: CNEI_RUNTIME_REGION
      value: {{ .values.region | quote }}
    - name: CNEI_RUNTIME_HOST
      value: "0.0.0.0"
    - name: CNEI_RUNTIME_ADVERTISE_HOST
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    - name: CNEI_RUNTIME_PORT
      value: {{ $r.port | quote }}
    - name: CNEI_RUNTIME_HTTP_PORT
      value: {{ $r.httpPort | quote }}
    - name: CNEI_RUNTIME_METRICS_PORT
      value: {{ $r.metricsPort | quote }}
    {{- if $r.tls.secretName }}
    - name: CNEI_RUNTIME_TLS_CERT_FILE
      value: /etc/cnei/tls/tls.crt
    - name: CNEI_RUNTIME_TLS_KEY_FILE
      value: /etc/cnei/tls/tls.key
    {{- with $r.tls.clientCaKey }}
    - name: CNEI_RUNTIME_TLS_CLIENT_CA_FILE
      value: {{ printf "/etc/cnei/tls/%s" . | quote }}
    {{- end }}
    {{- end }}
    - name: CNEI_RUNTIME_REGISTRY_TARGET
      value: {{ include "cnei.registryTarget" .ctx | quote }}
    {{- include "cnei.secretEnv" (dict "name" "CNEI_RUNTIME_REGISTRY_HEADERS" "secret" .ctx.Values.registryHeadersSecret
          "default" "registry-headers" "what" "registryHeadersSecret") | nindent 4 }}
    {{- include "cnei.registryCaEnv" (dict "ctx" .ctx "prefix" "CNEI_RUNTIME_") | nindent 4 }}
    {{- include "cnei.secretEnv" (dict "name" "CNEI_RUNTIME_RESTRICTED_APIS" "secret" .ctx.Values.runtimeRestrictedApisSecret
          "default" "runtime-restricted-apis" "what" "runtimeRestrictedApisSecret") | nindent 4 }}
    - name: CNEI_RUNTIME_REDIS_URL
      value: {{ include "cnei.redisUrl" .ctx | quote }}
    - name: CNEI_RUNTIME_NATS_URL
      value: {{ include "cnei.natsUrl" .ctx | quote }}
    {{- include "cnei.eventsEnv" (dict "ctx" .ctx "prefix" "CNEI_RUNTIME_") | nindent 4 }}
    - name: CNEI_RUNTIME_CACHE_DIR
      value: {{ $r.cacheDir | quote }}
    - name: CNEI_RUNTIME_CACHE_MAX_BYTES
      value: {{ .values.cacheMaxBytes | int64 | quote }}
    {{- if hasKey .values.env "CNEI_RUNTIME_DISK_CACHE_MAX_BYTES" }}
    {{- fail (printf "%sRuntime.env sets CNEI_RUNTIME_DISK_CACHE_MAX_BYTES: use %sRuntime.cache.budgetPercent (its share of cache.sizeLimit)" .tier .tier) }}
    {{- end }}
    - name: CNEI_RUNTIME_DISK_CACHE_MAX_BYTES
      value: {{ include "cnei.diskCacheBudget" (dict "tier" .tier "cache" .values.cache) | quote }}
    - name: CNEI_RUNTIME_USE_CUDA
      value: {{ .values.useCuda | quote }}
    - name: CNEI_RUNTIME_PRELOAD
      value: {{ join "," $r.preload | quote }}
    {{- if or (hasKey .values.env "CNEI_RUNTIME_HEARTBEAT_INTERVAL_S") (hasKey .values.env "CNEI_RUNTIME_HEARTBEAT_TTL_S") }}
    {{- fail (printf "%sRuntime.env sets CNEI_RUNTIME_HEARTBEAT_*: use %sRuntime.heartbeat.intervalS / ttlS" .tier .tier) }}
    {{- end }}
    {{- if not (and (gt (float64 .values.heartbeat.intervalS) 0.0) (lt (float64 .values.heartbeat.intervalS) (float64 .values.heartbeat.ttlS))) }}
    {{- fail (printf "%sRuntime.heartbeat.intervalS (%v) must be above 0 and below ttlS (%v)" .tier .values.heartbeat.intervalS .values.heartbeat.ttlS) }}
    {{- end }}
    - name: CNEI_RUNTIME_HEARTBEAT_INTERVAL_S
      value: {{ .values.heartbeat.intervalS | quote }}
    - name: CNEI_RUNTIME_HEARTBEAT_TTL_S
      value: {{ .values.heartbeat.ttlS | quote }}
    {{- with include "cnei.extraEnv" .values.env }}{{ . | nindent 4 }}{{ end }}
  ports:
    - name: grpc
      containerPort: {{ $r.port }}
    - name: http
      containerPort: {{ $r.httpPort }}
    - name: metrics
      containerPort: {{ $r.metricsPort }}
  {{- include "cnei.grpcProbes" (dict "ctx" .ctx "port" $r.port "tls" (not (empty $r.tls.secretName))) | trim | nindent 2 }}
  resources:
    {{- toYaml .values.resources | nindent 4 }}
  volumeMounts:
    - name: cache
      mountPath: {{ $r.cacheDir }}
    - name: tmp
      mountPath: /tmp
    {{- if $r.tls.secretName }}
    - name: tls
      mountPath: /etc/cnei/tls
      readOnly: true
    {{- end }}
    {{- include "cnei.registryCaMount" .ctx | nindent 4 }}
{{- end }}

{{/* The disk cache's byte budget: cache.budgetPercent of cache.sizeLimit (a quantity: 10Gi, 500M,
bytes), so the runtime deletes its least recently used artifacts before the kubelet evicts the pod
for outgrowing the emptyDir. Call with (dict "tier" "edge"|"cloud" "cache" .Values.edgeRuntime.cache). */}}
{{- define "cnei.diskCacheBudget" -}}
{{- $limit := toString .cache.sizeLimit }}
{{- $percent := .cache.budgetPercent }}
{{- if not (regexMatch "^[0-9]+([KMGTP]i|[kMGTP])?$" $limit) }}
{{- fail (printf "%sRuntime.cache.sizeLimit (%s) must be a whole number of bytes, with or without a suffix (Ki, Mi, Gi, Ti, Pi; k, M, G, T, P)" .tier $limit) }}
{{- end }}
{{- if not (and (gt (float64 $percent) 0.0) (lt (float64 $percent) 100.0)) }}
{{- fail (printf "%sRuntime.cache.budgetPercent (%v) must be above 0 and below 100" .tier $percent) }}
{{- end }}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000
      "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 }}
{{- $number := regexReplaceAll "^([0-9]+).*$" $limit "${1}" | int64 }}
{{- $unit := regexReplaceAll "^[0-9]+" $limit "" }}
{{- div (mul $number (get $units $unit) ($percent | int64)) 100 }}
{{- end }}

{{- define "cnei.runtimeVolumes" -}}
- name: cache
  emptyDir:
    sizeLimit: {{ .values.cache.sizeLimit }}
{{ include "cnei.tmpVolume" .ctx }}
{{- include "cnei.registryCaVolume" .ctx }}
{{- with .ctx.Values.runtime.tls.secretName }}
- name: tls
  secret:
    secretName: {{ . | quote }}
{{- end }}
{{- end }}

{{/* Call with (dict "ctx" $ "component" "edge-runtime" "values" .Values.edgeRuntime). */}}
{{- define "cnei.runtimeService" -}}
{{- $c := dict "ctx" .ctx "component" .component }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "cnei.componentName" $c }}
  labels:
    {{- include "cnei.labels" $c | nindent 4 }}
    cnei.io/metrics: "true"
  {{- with .values.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ .values.service.type }}
  {{- with .values.service.internalTrafficPolicy }}
  internalTrafficPolicy: {{ . }}
  {{- end }}
  selector:
    {{- include "cnei.selectorLabels" $c | nindent 4 }}
  ports:
    - name: grpc
      port: {{ .ctx.Values.runtime.port }}
      targetPort: grpc
      appProtocol: {{ ternary "https" "kubernetes.io/h2c" (not (empty .ctx.Values.runtime.tls.secretName)) }}
    - name: http
      port: {{ .ctx.Values.runtime.httpPort }}
      targetPort: http
      appProtocol: {{ ternary "https" "http" (not (empty .ctx.Values.runtime.tls.secretName)) }}
    - name: metrics
      port: {{ .ctx.Values.runtime.metricsPort }}
      targetPort: metrics
{{- end }}
