{{- /*
Names, labels and the RBAC rules shared by the ClusterRole and the per-namespace Roles.
*/ -}}

{{- define "melange-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- /* Release-qualified name; the release name alone when it already contains the chart name. */ -}}
{{- define "melange-operator.fullname" -}}
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

{{- define "melange-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- /* Selector labels: name and instance only, because selectors are immutable. */ -}}
{{- define "melange-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "melange-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "melange-operator.labels" -}}
{{ include "melange-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "melange-operator.chart" . }}
{{- with .Values.additionalLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "melange-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "melange-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "melange-operator.leaseName" -}}
{{- default (include "melange-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{- /* `resource.group` of a clusterScopedTargets entry, as (dict "resource" ... "group" ...). */ -}}
{{- define "melange-operator.resourceGroup" -}}
{{- $parts := splitn "." 2 . }}
{{- dict "resource" $parts._0 "group" $parts._1 | toJson }}
{{- end }}

{{- define "melange-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- /*
What the operator does with the API, and nothing more:
- allocations: Kopf lists and watches them (an index, no handlers that write: no annotations, no
  finalizer); the operator's one writer patches their status through /status;
- events: the operator posts core v1 Events (create; patch for updates of an Event series);
- each scale target: get+patch on <resource>/scale, or get+patch on the object itself for kinds
  whose replica count the operator sets through spec.gpus[].replicasPath;
- optionally, the Secrets and ConfigMaps that hold a Prometheus rate source's token and CA.
*/ -}}
{{- define "melange-operator.rules" -}}
- apiGroups: ["melange.dev"]
  resources: ["melangeallocations"]
  verbs: ["list", "watch"]
- apiGroups: ["melange.dev"]
  resources: ["melangeallocations/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- range .Values.rbac.scaleTargets }}
- apiGroups: [{{ .apiGroup | quote }}]
  {{- if eq (default "scale" .via) "scale" }}
  resources: [{{ printf "%s/scale" .resource | quote }}]
  verbs: ["get", "patch"]
- apiGroups: [{{ .apiGroup | quote }}]
  resources: [{{ .resource | quote }}]
  verbs: ["get"]
  {{- else }}
  resources: [{{ .resource | quote }}]
  verbs: ["get", "patch"]
  {{- end }}
{{- end }}
{{- with .Values.rbac.priceSources }}
{{- if .enabled }}
- apiGroups: [""]
  resources: ["configmaps"]
  {{- with .configMapNames }}
  resourceNames: {{ toJson . }}
  {{- end }}
  verbs: ["get"]
{{- end }}
{{- end }}
{{- with .Values.rbac.rateSourceCredentials }}
{{- if .enabled }}
- apiGroups: [""]
  resources: ["secrets"]
  {{- with .secretNames }}
  resourceNames: {{ toJson . }}
  {{- end }}
  verbs: ["get"]
- apiGroups: [""]
  resources: ["configmaps"]
  {{- with .configMapNames }}
  resourceNames: {{ toJson . }}
  {{- end }}
  verbs: ["get"]
{{- end }}
{{- end }}
{{- end }}
