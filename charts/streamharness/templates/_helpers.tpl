{{- define "streamharness.fullname" -}}
{{- printf "%s" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "streamharness.labels" -}}
app.kubernetes.io/part-of: streamharness
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- /* The Secret holding SH_AUTH_INTERNAL_SECRET: auth.internalSecret.existingSecret, else the one
templates/internal-secret.yaml creates. */ -}}
{{- define "streamharness.internalSecretName" -}}
{{- with .Values.auth.internalSecret.existingSecret -}}
{{- tpl . $ -}}
{{- else -}}
{{- printf "%s-internal-token" (include "streamharness.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- /* Selector labels of every pod of the release (components and Jobs). */ -}}
{{- define "streamharness.releaseSelector" -}}
app.kubernetes.io/part-of: streamharness
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- /* The Secret holding a component's api-keys.json: apiKeys.existingSecret (a template), else, when
apiKeys.generate lists tenants, <release>-api-keys (templates/api-keys-secret.yaml), else "" (no
keys file). Argument: (dict "root" $ "c" <the component's values>). */ -}}
{{- define "streamharness.apiKeysSecretName" -}}
{{- $spec := .c.apiKeys | default dict -}}
{{- if $spec.existingSecret -}}
{{- tpl $spec.existingSecret .root -}}
{{- else if $spec.generate -}}
{{- include "streamharness.generatedApiKeysName" .root -}}
{{- end -}}
{{- end -}}

{{- /* The Secret of generated key hashes (its twin holding the keys: the same name + "-plain"). */ -}}
{{- define "streamharness.generatedApiKeysName" -}}
{{- printf "%s-api-keys" (include "streamharness.fullname" .) -}}
{{- end -}}

{{- /* The plaintext port of the gRPC health service alone (SH_GRPC_HEALTH_PORT) of a component whose
gRPC port speaks TLS: tls.healthPort when tls.enabled, else "". Argument: the component's values. */ -}}
{{- define "streamharness.healthPort" -}}
{{- $tls := .tls | default dict -}}
{{- if $tls.enabled -}}
{{- $tls.healthPort | default 50061 | int -}}
{{- end -}}
{{- end -}}

{{- /* The port of a component's Prometheus endpoint (SH_TELEMETRY_METRICS_PORT): metrics.port when
metrics.enabled and the component has metrics: true, else "". Argument: (dict "root" $ "c" <the
component's values>). */ -}}
{{- define "streamharness.metricsPort" -}}
{{- if and .root.Values.metrics.enabled .c.metrics -}}
{{- .root.Values.metrics.port | int -}}
{{- end -}}
{{- end -}}
