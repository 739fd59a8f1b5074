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
