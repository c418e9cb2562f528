{{/*
Chart name, truncated to the 63 characters a label may have.
*/}}
{{- define "llm-quota.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name: <release>-<chart> unless the release name already
contains the chart name.
*/}}
{{- define "llm-quota.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llm-quota.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llm-quota.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-quota.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llm-quota.labels" -}}
helm.sh/chart: {{ include "llm-quota.chart" . }}
{{ include "llm-quota.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "llm-quota.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The Secret holding ADMIN_PASSWORD, DATABASE_URL and REDIS_URL: the user's
existingSecret or the chart's own.
*/}}
{{- define "llm-quota.secretName" -}}
{{- if .Values.existingSecret -}}
{{- .Values.existingSecret -}}
{{- else -}}
{{- include "llm-quota.fullname" . -}}
{{- end -}}
{{- end -}}

{{/*
Key names inside that Secret.
*/}}
{{- define "llm-quota.secretKey.adminPassword" -}}
{{- if .Values.existingSecret }}{{ .Values.existingSecretKeys.adminPassword }}{{ else }}ADMIN_PASSWORD{{ end -}}
{{- end -}}
{{- define "llm-quota.secretKey.databaseUrl" -}}
{{- if .Values.existingSecret }}{{ .Values.existingSecretKeys.databaseUrl }}{{ else }}DATABASE_URL{{ end -}}
{{- end -}}
{{- define "llm-quota.secretKey.redisUrl" -}}
{{- if .Values.existingSecret }}{{ .Values.existingSecretKeys.redisUrl }}{{ else }}REDIS_URL{{ end -}}
{{- end -}}
{{- define "llm-quota.secretKey.sessionSecret" -}}
{{- if .Values.existingSecret }}{{ .Values.existingSecretKeys.sessionSecret }}{{ else if .Values.secrets.sessionSecret }}SESSION_SECRET{{ end -}}
{{- end -}}

{{/*
Cluster mode only: fail the render with a clear message when a required
value is missing or points at the wrong kind of store.
*/}}
{{- define "llm-quota.validate" -}}
{{- if not .Values.existingSecret -}}
{{- $admin := required "secrets.adminPassword is required (or set existingSecret): every replica must share ADMIN_PASSWORD" .Values.secrets.adminPassword -}}
{{- $db := required "secrets.databaseUrl is required (or set existingSecret): a postgres:// DATABASE_URL" .Values.secrets.databaseUrl -}}
{{- $redis := required "secrets.redisUrl is required (or set existingSecret): a redis:// REDIS_URL" .Values.secrets.redisUrl -}}
{{- if not (regexMatch "^postgres(ql)?(\\+[a-z0-9]+)?://" $db) -}}
{{- fail "secrets.databaseUrl must be a postgres:// URL: this chart runs cluster mode (SQLite is for a single embedded instance)" -}}
{{- end -}}
{{- if not (regexMatch "^rediss?://" $redis) -}}
{{- fail "secrets.redisUrl must be a redis:// URL" -}}
{{- end -}}
{{- else -}}
{{- if or (not .Values.existingSecretKeys.adminPassword) (not .Values.existingSecretKeys.databaseUrl) (not .Values.existingSecretKeys.redisUrl) -}}
{{- fail "existingSecretKeys.adminPassword, .databaseUrl and .redisUrl must name keys of the existingSecret" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- fail "autoscaling.maxReplicas must be at least autoscaling.minReplicas" -}}
{{- end -}}
{{- end -}}

{{/*
The secret environment variables, for the gateway container.
*/}}
{{- define "llm-quota.secretEnv" -}}
- name: ADMIN_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "llm-quota.secretName" . }}
      key: {{ include "llm-quota.secretKey.adminPassword" . }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "llm-quota.secretName" . }}
      key: {{ include "llm-quota.secretKey.databaseUrl" . }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "llm-quota.secretName" . }}
      key: {{ include "llm-quota.secretKey.redisUrl" . }}
{{- $sessionKey := include "llm-quota.secretKey.sessionSecret" . }}
{{- if $sessionKey }}
- name: SESSION_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "llm-quota.secretName" . }}
      key: {{ $sessionKey }}
{{- end }}
{{- end -}}

{{- define "llm-quota.terminationGracePeriodSeconds" -}}
{{- add .Values.shutdown.preStopSleepSeconds .Values.shutdown.graceSeconds .Values.shutdown.flushSeconds -}}
{{- end -}}
