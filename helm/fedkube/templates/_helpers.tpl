{{/*
Expand the name of the chart.
*/}}
{{- define "fedkube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "fedkube.fullname" -}}
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

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "fedkube.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "fedkube.labels" -}}
helm.sh/chart: {{ include "fedkube.chart" . }}
{{ include "fedkube.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "fedkube.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedkube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "fedkube.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedkube.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------
fedkube's additions; the scaffold's helpers above are unchanged.
--------------------------------------------------------------------------- */}}

{{/*
Name of the operator's Deployment, Service and RBAC objects.
*/}}
{{- define "fedkube.operatorName" -}}
{{- printf "%s-operator" (include "fedkube.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels and selector labels of the operator (component "operator").
*/}}
{{- define "fedkube.operatorLabels" -}}
{{ include "fedkube.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "fedkube.operatorSelectorLabels" -}}
{{ include "fedkube.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The image the operator runs: repository:tag, the tag defaulting to the chart's appVersion.
*/}}
{{- define "fedkube.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The image of coordinator and agent pods; each part defaults to the operator's.
*/}}
{{- define "fedkube.coordinatorImage" -}}
{{- $repository := .Values.coordinator.image.repository | default .Values.image.repository }}
{{- $tag := .Values.coordinator.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/*
RBAC rules kept in files/rbac/<name>.yaml, a copy of operator/rbac/<name>.yaml that
scripts/sync-chart.py maintains (a test fails when the copy is stale).
Usage: include "fedkube.rbacRules" (list . "operator-role")
*/}}
{{- define "fedkube.rbacRules" -}}
{{- $root := index . 0 }}
{{- $file := printf "files/rbac/%s.yaml" (index . 1) }}
{{- $role := $root.Files.Get $file | fromYaml }}
{{- if not $role.rules }}
{{- fail (printf "%s holds no RBAC rules; run scripts/sync-chart.py" $file) }}
{{- end }}
{{- toYaml $role.rules }}
{{- end }}

{{/*
imagePullSecrets as a comma-separated list of names, for the operator to copy into the
pods it creates.
*/}}
{{- define "fedkube.pullSecretNames" -}}
{{- $names := list }}
{{- range .Values.imagePullSecrets }}
{{- $names = append $names .name }}
{{- end }}
{{- join "," $names }}
{{- end }}
