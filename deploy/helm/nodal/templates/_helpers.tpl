{{- define "nodal.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "nodal.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "nodal.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "nodal.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "nodal.fullname" .)) -}}
{{- end -}}

{{- define "nodal.claimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-spool" (include "nodal.fullname" .)) -}}
{{- end -}}

{{/* node.yaml: the user's config with the chart's own keys (data dir, queue backend) on top */}}
{{- define "nodal.config" -}}
{{- $queue := dict "backend" (ternary "celery" "embedded" .Values.workers.enabled) -}}
{{- $jobs := merge (dict "workers" .Values.receiver.embeddedWorkers) (.Values.config.jobs | default dict) -}}
{{- $node := merge (dict "data_dir" "/var/lib/nodal" "bind_address" "0.0.0.0") (.Values.config.node | default dict) -}}
{{- $cfg := merge (dict "node" $node "queue" $queue "jobs" $jobs) (omit .Values.config "node" "queue" "jobs") -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* what receiver and worker pods share: image, config, secrets, spool, security */}}
{{- define "nodal.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
volumes:
  - name: config
    configMap:
      name: {{ include "nodal.fullname" . }}-config
  - name: data
    persistentVolumeClaim:
      claimName: {{ include "nodal.claimName" . }}
  - name: tmp
    emptyDir: {}
{{- end -}}

{{- define "nodal.containerCommon" -}}
image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
imagePullPolicy: {{ .Values.image.pullPolicy }}
env:
  - name: NODAL_CONFIG
    value: /etc/nodal/node.yaml
  - name: POD_NAME
    valueFrom:
      fieldRef: {fieldPath: metadata.name}
envFrom:
  - secretRef:
      name: {{ include "nodal.secretName" . }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  - name: config
    mountPath: /etc/nodal
    readOnly: true
  - name: data
    mountPath: /var/lib/nodal
  - name: tmp
    mountPath: /tmp
{{- end -}}
