{{- define "chat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chat.fullname" -}}
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

{{- define "chat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "chat.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "chat.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "chat.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{- define "chat.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "chat.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "chat.secretName" -}}
{{- default (printf "%s-secrets" (include "chat.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "chat.cnpgName" -}}
{{- default (printf "%s-pg" (include "chat.fullname" .)) .Values.postgresql.cnpg.name -}}
{{- end -}}

{{- define "chat.redisName" -}}
{{- default (printf "%s-redis" (include "chat.fullname" .)) .Values.redis.operator.name -}}
{{- end -}}

{{- define "chat.otelName" -}}
{{- printf "%s-otel" (include "chat.fullname" .) -}}
{{- end -}}

{{/*
Where each secret comes from: a list of {var, secret, key}. DATABASE_URL is
absent when it is composed from the CNPG app secret for the pooler, and
REDIS_URL when the operator's Redis (no password) provides a plain URL.
*/}}
{{- define "chat.secretSources" -}}
{{- $s := .Values.secrets -}}
{{- $name := include "chat.secretName" . -}}
{{- $out := list (dict "var" "JWT_SECRET" "secret" $name "key" $s.keys.jwtSecret) -}}
{{- if .Values.postgresql.cnpg.enabled -}}
{{- if not .Values.postgresql.cnpg.pooler.enabled -}}
{{- $out = append $out (dict "var" "DATABASE_URL" "secret" (printf "%s-app" (include "chat.cnpgName" .)) "key" "uri") -}}
{{- end -}}
{{- else -}}
{{- $out = append $out (dict "var" "DATABASE_URL" "secret" $name "key" $s.keys.databaseUrl) -}}
{{- end -}}
{{- if not .Values.redis.operator.enabled -}}
{{- $out = append $out (dict "var" "REDIS_URL" "secret" $name "key" $s.keys.redisUrl) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "chat.redisUrl" -}}
{{- $r := include "chat.redisName" . -}}
{{- if eq .Values.redis.operator.mode "replication" -}}
redis://{{ $r }}-master:6379
{{- else -}}
redis://{{ $r }}:6379
{{- end -}}
{{- end -}}

{{/* Environment of the service: secrets (as env or _FILE), URLs from operators. */}}
{{- define "chat.secretEnv" -}}
{{- range (include "chat.secretSources" . | fromJsonArray) }}
{{- if $.Values.secrets.mountAsFiles }}
- name: {{ .var }}_FILE
  value: /var/run/secrets/chat/{{ .var }}
{{- else }}
- name: {{ .var }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- if and .Values.postgresql.cnpg.enabled .Values.postgresql.cnpg.pooler.enabled }}
- name: CNPG_APP_USER
  valueFrom:
    secretKeyRef:
      name: {{ include "chat.cnpgName" . }}-app
      key: username
- name: CNPG_APP_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "chat.cnpgName" . }}-app
      key: password
- name: DATABASE_URL
  value: postgres://$(CNPG_APP_USER):$(CNPG_APP_PASSWORD)@{{ include "chat.cnpgName" . }}-pooler-rw:5432/{{ .Values.postgresql.cnpg.database }}
{{- end }}
{{- if .Values.redis.operator.enabled }}
- name: REDIS_URL
  value: {{ include "chat.redisUrl" . }}
{{- end }}
{{- end -}}

{{/* Projected volume of the secrets when mounted as files. */}}
{{- define "chat.secretVolume" -}}
- name: secrets
  projected:
    defaultMode: 0440
    sources:
    {{- range (include "chat.secretSources" . | fromJsonArray) }}
      - secret:
          name: {{ .secret }}
          items:
            - key: {{ .key }}
              path: {{ .var }}
    {{- end }}
{{- end -}}
