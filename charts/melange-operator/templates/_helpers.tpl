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
- optionally, the Secrets and ConfigMaps that hold a Prometheus rate source's token and CA;
- optionally, the routing tables' ConfigMaps it publishes (create; get, update, delete).
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
{{- with .Values.rbac.routingConfigMaps }}
{{- if .enabled }}
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["configmaps"]
  {{- with .allocations }}
  resourceNames: [{{ range $i, $name := . }}{{ if $i }}, {{ end }}{{ printf "%s-routing" $name | quote }}{{ end }}]
  {{- end }}
  verbs: ["get", "update", "delete"]
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

{{- /*
The affinity of a pod: the values' affinity, plus two defaults, each unless the value has its key:
a nodeAffinity that keeps the pod off GPU nodes, and a soft podAntiAffinity that spreads the
replicas across nodes. Called with (dict "affinity" <the value> "selector" <selector labels>).
*/ -}}
{{- define "melange-operator.affinity" -}}
{{- $affinity := deepCopy (default (dict) .affinity) }}
{{- if not (hasKey $affinity "nodeAffinity") }}
{{- $offGPUs := list (dict "key" "nvidia.com/gpu.present" "operator" "NotIn" "values" (list "true")) (dict "key" "cloud.google.com/gke-accelerator" "operator" "DoesNotExist") }}
{{- $_ := set $affinity "nodeAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (dict "nodeSelectorTerms" (list (dict "matchExpressions" $offGPUs)))) }}
{{- end }}
{{- if not (hasKey $affinity "podAntiAffinity") }}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" .selector) }}
{{- $_ := set $affinity "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "podAffinityTerm" $term))) }}
{{- end }}
{{- toYaml $affinity }}
{{- end }}

{{- /*
The router (`melange route`, router.enabled). Its own app.kubernetes.io/name, <name>-router, so
that none of the operator's selectors (Deployment, Service, PodDisruptionBudget, ServiceMonitor,
NetworkPolicy, anti-affinity) ever matches a router pod or Service, nor the router's an operator's.
*/ -}}
{{- define "melange-operator.router.fullname" -}}
{{- printf "%s-router" (include "melange-operator.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "melange-operator.router.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-router" (include "melange-operator.name" . | trunc 56 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "melange-operator.router.labels" -}}
{{ include "melange-operator.router.selectorLabels" . }}
app.kubernetes.io/component: router
app.kubernetes.io/part-of: {{ include "melange-operator.name" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "melange-operator.chart" . }}
{{- with .Values.additionalLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "melange-operator.router.serviceAccountName" -}}
{{- if .Values.router.serviceAccount.create }}
{{- default (include "melange-operator.router.fullname" .) .Values.router.serviceAccount.name }}
{{- else }}
{{- required "router.serviceAccount.name is required when router.serviceAccount.create is false" .Values.router.serviceAccount.name }}
{{- end }}
{{- end }}

{{- /* The allocation's namespace: where its routing ConfigMap and upstream Services are. */ -}}
{{- define "melange-operator.router.allocationNamespace" -}}
{{- default .Release.Namespace .Values.router.allocation.namespace }}
{{- end }}

{{- /* The ConfigMap the operator publishes the allocation's routing table in. */ -}}
{{- define "melange-operator.router.configMap" -}}
{{- printf "%s-routing" (required "router.allocation.name is required when router.enabled is true" .Values.router.allocation.name) }}
{{- end }}

{{- define "melange-operator.router.image" -}}
{{- $image := .Values.router.image }}
{{- if not $image.repository }}
{{- include "melange-operator.image" . }}
{{- else if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}
