{{- define "quotagate.env" -}}
- name: QUOTAGATE_REDIS_URL
  valueFrom: {secretKeyRef: {name: {{ .Values.secretName | quote }}, key: redis-url}}
- name: QUOTAGATE_DATABASE_URL
  valueFrom: {secretKeyRef: {name: {{ .Values.secretName | quote }}, key: database-url}}
{{- range $name, $value := .Values.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}
