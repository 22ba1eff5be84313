{{/* Names, labels and the pieces every CNEI pod shares. */}}

{{- define "cnei.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-wide prefix of every object name; components append "-<component>". */}}
{{- define "cnei.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "cnei.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "cnei.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Name of a component's objects; call with (dict "ctx" $ "component" "registry"). */}}
{{- define "cnei.componentName" -}}
{{- printf "%s-%s" (include "cnei.fullname" .ctx) .component }}
{{- end }}

{{- define "cnei.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cnei.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cnei.labels" -}}
{{ include "cnei.selectorLabels" . }}
app.kubernetes.io/part-of: cnei
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "cnei.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cnei.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cnei.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Addresses the services dial. */}}
{{- define "cnei.registryTarget" -}}
{{- printf "%s:%v" (include "cnei.componentName" (dict "ctx" . "component" "registry")) .Values.registry.port }}
{{- end }}

{{/* How a service makes the events stream when none has yet: its copies (nats.stream.replicas, or
0: as many as the chart's NATS cluster has servers, at most 3; 1 for an external NATS) and limits. */}}
{{- define "cnei.eventsEnv" -}}
{{- $n := .ctx.Values.nats -}}
{{- $replicas := int ($n.stream.replicas | default 0) -}}
{{- if eq $replicas 0 }}{{ $replicas = ternary (min (int $n.replicas) 3) 1 $n.enabled }}{{ end -}}
- name: {{ .prefix }}EVENTS_STREAM_REPLICAS
  value: {{ $replicas | quote }}
- name: {{ .prefix }}EVENTS_MAX_AGE_S
  value: {{ $n.stream.maxAgeSeconds | int64 | quote }}
- name: {{ .prefix }}EVENTS_MAX_BYTES
  value: {{ $n.stream.maxBytes | int64 | quote }}
{{- end }}

{{- define "cnei.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- printf "nats://%s:4222" (include "cnei.componentName" (dict "ctx" . "component" "nats")) }}
{{- else }}
{{- required "nats.url is required when nats.enabled is false" .Values.nats.url }}
{{- end }}
{{- end }}

{{- define "cnei.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:6379/0" (include "cnei.componentName" (dict "ctx" . "component" "redis")) }}
{{- else }}
{{- required "redis.url is required when redis.enabled is false" .Values.redis.url }}
{{- end }}
{{- end }}

{{/* Pod-level fields of every CNEI pod. */}}
{{- define "cnei.podSpec" -}}
serviceAccountName: {{ include "cnei.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Container fields of every CNEI container (image, security, telemetry env first). */}}
{{- define "cnei.container" -}}
image: {{ include "cnei.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- end }}

{{- define "cnei.telemetryEnv" -}}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_SERVICE_VERSION
  value: {{ .Chart.AppVersion | quote }}
- name: CNEI_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- end }}

{{/* An env entry read from a Secret: (dict "name" VAR "secret" {name, key} "default" KEY "what" PATH);
nothing when the secret is not set. */}}
{{- define "cnei.secretEnv" -}}
{{- with .secret }}
- name: {{ $.name }}
  valueFrom:
    secretKeyRef:
      name: {{ required (printf "%s.name" $.what) .name | quote }}
      key: {{ .key | default $.default | quote }}
{{- end }}
{{- end }}

{{/* A component's `env` map as container env entries, in key order, values as strings. */}}
{{- define "cnei.extraEnv" -}}
{{- $entries := list }}
{{- range $name, $value := . }}
{{- $text := toString $value }}
{{- /* Helm values hold numbers as float64: print whole ones without an exponent. */}}
{{- if and (kindIs "float64" $value) (eq $value (floor $value)) }}
{{- $text = $value | int64 | toString }}
{{- end }}
{{- $entries = append $entries (dict "name" $name "value" $text) }}
{{- end }}
{{- if $entries }}{{ toYaml $entries }}{{ end }}
{{- end }}

{{/* Startup, liveness and readiness probes on the gRPC health service at `.port`. Kubernetes'
gRPC probe speaks plaintext: a port on TLS is probed by the image's health check run in the
container (`.exec`: its arguments after HOST:PORT, the TLS files and the name its clients check)
or, where the pod holds no CA to check it with, by a TCP connect. */}}
{{- define "cnei.grpcProbes" -}}
{{- $p := .ctx.Values.probes }}
{{- $check := printf "grpc: {port: %v}" .port }}
{{- if and .tls .exec }}
{{- $command := concat (list "python" "-m" "services.cli.healthcheck" (printf "127.0.0.1:%v" .port)) .exec }}
{{- $check = printf "exec: {command: %s}" (toJson $command) }}
{{- else if .tls }}
{{- $check = printf "tcpSocket: {port: %v}" .port }}
{{- end }}
startupProbe:
  {{ $check }}
  {{- toYaml $p.startup | nindent 2 }}
livenessProbe:
  {{ $check }}
  {{- toYaml $p.liveness | nindent 2 }}
readinessProbe:
  {{ $check }}
  {{- toYaml $p.readiness | nindent 2 }}
{{- end }}

{{/* A client's trust in servers on TLS (the registry: registry.tls; the runtimes: runtime.tls):
the CA from a Secret that holds nothing else (caSecretName, key caKey: never the serving Secret,
whose key a node fetching it would hold too), and for mutual TLS the clients' certificate
(clientSecretName); for runtimes also the name their certificate holds (serverName: pods are
dialled at their IPs). Call with (dict "tls" .Values.registry.tls "what" "registry" "kind"
"REGISTRY" "prefix" "CNEI_COORDINATOR_"); mounts under /etc/cnei/<what>-ca and -client; each
renders nothing without TLS. */}}
{{- define "cnei.clientTlsCheck" -}}
{{- with .tls }}
{{- if and .secretName (not .caSecretName) }}
{{- fail (printf "%s.tls.caSecretName: name a Secret holding only the CA its clients trust (not the serving Secret)" $.what) }}
{{- end }}
{{- if and .clientCaKey (not .clientSecretName) }}
{{- fail (printf "%s.tls.clientSecretName: mutual TLS needs the clients' certificate (a kubernetes.io/tls Secret)" $.what) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cnei.clientTlsEnv" -}}
{{- with .tls }}
{{- if .secretName }}
- name: {{ printf "%s%s_TLS_CA_FILE" $.prefix $.kind }}
  value: {{ printf "/etc/cnei/%s-ca/ca.crt" $.what }}
{{- if .clientSecretName }}
- name: {{ printf "%s%s_TLS_CERT_FILE" $.prefix $.kind }}
  value: {{ printf "/etc/cnei/%s-client/tls.crt" $.what }}
- name: {{ printf "%s%s_TLS_KEY_FILE" $.prefix $.kind }}
  value: {{ printf "/etc/cnei/%s-client/tls.key" $.what }}
{{- end }}
{{- with .serverName }}
- name: {{ printf "%s%s_TLS_SERVER_NAME" $.prefix $.kind }}
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cnei.clientTlsMount" -}}
{{- with .tls }}
{{- if .secretName }}
- name: {{ $.what }}-ca
  mountPath: {{ printf "/etc/cnei/%s-ca" $.what }}
  readOnly: true
{{- if .clientSecretName }}
- name: {{ $.what }}-client
  mountPath: {{ printf "/etc/cnei/%s-client" $.what }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cnei.clientTlsVolume" -}}
{{- with .tls }}
{{- if .secretName }}
- name: {{ $.what }}-ca
  secret:
    secretName: {{ .caSecretName | quote }}
    items:
      - key: {{ .caKey | default "ca.crt" | quote }}
        path: ca.crt
{{- if .clientSecretName }}
- name: {{ $.what }}-client
  secret:
    secretName: {{ .clientSecretName | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The registry's clients (coordinator, runtimes, trainer): cnei.clientTls* for registry.tls.
Call the env one with (dict "ctx" $ "prefix" "CNEI_COORDINATOR_"). */}}
{{- define "cnei.registryTlsCheck" -}}
{{- include "cnei.clientTlsCheck" (dict "tls" .Values.registry.tls "what" "registry") }}
{{- end }}

{{- define "cnei.registryCaEnv" -}}
{{- include "cnei.clientTlsEnv" (dict "tls" .ctx.Values.registry.tls "what" "registry" "kind" "REGISTRY" "prefix" .prefix) }}
{{- end }}

{{- define "cnei.registryCaMount" -}}
{{- include "cnei.clientTlsMount" (dict "tls" .Values.registry.tls "what" "registry") }}
{{- end }}

{{- define "cnei.registryCaVolume" -}}
{{- include "cnei.clientTlsVolume" (dict "tls" .Values.registry.tls "what" "registry") }}
{{- end }}

{{/* The health check of the registry on TLS, as its clients reach it (cnei.registryCaMount's files,
the registry Service's name): cnei.grpcProbes' `.exec`. */}}
{{- define "cnei.registryProbeTls" -}}
{{- $tls := .Values.registry.tls }}
{{- $args := list "--timeout" "1" "--tls-ca" "/etc/cnei/registry-ca/ca.crt" }}
{{- if $tls.clientSecretName }}
{{- $args = concat $args (list "--tls-cert" "/etc/cnei/registry-client/tls.crt" "--tls-key" "/etc/cnei/registry-client/tls.key") }}
{{- end }}
{{- $name := include "cnei.componentName" (dict "ctx" . "component" "registry") }}
{{- toJson (concat $args (list "--tls-server-name" $name)) }}
{{- end }}

{{/* The runtimes' clients (coordinator, trainer): cnei.clientTls* for runtime.tls. */}}
{{- define "cnei.nodeTlsCheck" -}}
{{- include "cnei.clientTlsCheck" (dict "tls" .Values.runtime.tls "what" "runtime") }}
{{- if and .Values.runtime.tls.secretName (not .Values.runtime.tls.serverName) }}
{{- fail "runtime.tls.serverName: the name every runtime's certificate holds (runtimes are dialled at their pod IPs)" }}
{{- end }}
{{- end }}

{{- define "cnei.nodeCaEnv" -}}
{{- include "cnei.clientTlsEnv" (dict "tls" .ctx.Values.runtime.tls "what" "node" "kind" "NODE" "prefix" .prefix) }}
{{- end }}

{{- define "cnei.nodeCaMount" -}}
{{- include "cnei.clientTlsMount" (dict "tls" .Values.runtime.tls "what" "node") }}
{{- end }}

{{- define "cnei.nodeCaVolume" -}}
{{- include "cnei.clientTlsVolume" (dict "tls" .Values.runtime.tls "what" "node") }}
{{- end }}

{{/* Scratch space: the root filesystem is read-only. */}}
{{- define "cnei.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- end }}

{{/* A component's affinity, or by default a required rule keeping it off edge nodes. */}}
{{- define "cnei.cloudAffinity" -}}
{{- if .affinity }}
{{- toYaml .affinity }}
{{- else if .ctx.Values.edgeNodes.cloudExpressions }}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      - matchExpressions:
          {{- toYaml .ctx.Values.edgeNodes.cloudExpressions | nindent 10 }}
{{- end }}
{{- end }}

{{/* Placement of a cloud-side pod: call with (dict "ctx" $ "values" .Values.<component>). */}}
{{- define "cnei.cloudPlacement" -}}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (include "cnei.cloudAffinity" (dict "ctx" .ctx "affinity" .values.affinity) | trim) }}
affinity:
  {{- . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
