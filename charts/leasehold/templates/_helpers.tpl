{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "leasehold.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: fullnameOverride, or "<release>-<chart>" unless the release name
already contains the chart name. Kept at 40 characters so that the longest
suffix we append ("-broker-tls", "-controller-namespaced") still fits in 63.
*/}}
{{- define "leasehold.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"name-version" for the helm.sh/chart label.
*/}}
{{- define "leasehold.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "leasehold.labels" -}}
helm.sh/chart: {{ include "leasehold.chart" . }}
{{ include "leasehold.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: leasehold
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels shared by all components.
*/}}
{{- define "leasehold.selectorLabels" -}}
app.kubernetes.io/name: {{ include "leasehold.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Per-component labels. Call with (dict "ctx" $ "component" "controller").
*/}}
{{- define "leasehold.componentLabels" -}}
{{ include "leasehold.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "leasehold.componentSelectorLabels" -}}
{{ include "leasehold.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The leasehold image reference: digest wins over tag; tag defaults to appVersion.
*/}}
{{- define "leasehold.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
ServiceAccount names. An existing account (create: false) must be named.
*/}}
{{- define "leasehold.controllerServiceAccountName" -}}
{{- if .Values.serviceAccount.controller.create }}
{{- default (printf "%s-controller" (include "leasehold.fullname" .)) .Values.serviceAccount.controller.name }}
{{- else }}
{{- required "serviceAccount.controller.name is required when serviceAccount.controller.create is false" .Values.serviceAccount.controller.name }}
{{- end }}
{{- end }}

{{- define "leasehold.nodeServiceAccountName" -}}
{{- if .Values.serviceAccount.node.create }}
{{- default (printf "%s-node" (include "leasehold.fullname" .)) .Values.serviceAccount.node.name }}
{{- else }}
{{- required "serviceAccount.node.name is required when serviceAccount.node.create is false" .Values.serviceAccount.node.name }}
{{- end }}
{{- end }}

{{/*
Names shared between the controller (which creates these objects) and the
node driver (which reads them). Keep them in one place.
*/}}
{{- define "leasehold.brokerServiceName" -}}
{{- printf "%s-broker" (include "leasehold.fullname" .) }}
{{- end }}

{{- define "leasehold.crlServiceName" -}}
{{- printf "%s-crl" (include "leasehold.fullname" .) }}
{{- end }}

{{- define "leasehold.acmeSolverServiceName" -}}
{{- printf "%s-acme-solver" (include "leasehold.fullname" .) }}
{{- end }}

{{- define "leasehold.metricsServiceName" -}}
{{- printf "%s-metrics" (include "leasehold.fullname" .) }}
{{- end }}

{{- define "leasehold.brokerCAConfigMapName" -}}
{{- printf "%s-broker-ca" (include "leasehold.fullname" .) }}
{{- end }}

{{- define "leasehold.brokerGeneratedSecretName" -}}
{{- printf "%s-broker-tls" (include "leasehold.fullname" .) }}
{{- end }}

{{- define "leasehold.leaderElectionLeaseName" -}}
{{- printf "%s-controller" (include "leasehold.fullname" .) }}
{{- end }}

{{- define "leasehold.brokerURL" -}}
{{- printf "https://%s.%s.svc:%d" (include "leasehold.brokerServiceName" .) .Release.Namespace (int .Values.broker.port) }}
{{- end }}

{{/*
The CSI driver name. Fixed: the binary reports it from GetPluginInfo and the
kubelet matches volumes to drivers by it.
*/}}
{{- define "leasehold.csiDriverName" -}}
csi.leasehold.dev
{{- end }}

{{/*
Host path of the directory holding the driver's socket, and the socket itself
as the kubelet sees it.
*/}}
{{- define "leasehold.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.node.kubeletDir) (include "leasehold.csiDriverName" .) }}
{{- end }}

{{- define "leasehold.kubeletRegistrationPath" -}}
{{- printf "%s/csi.sock" (include "leasehold.pluginDir" .) }}
{{- end }}

{{/*
The hardened container securityContext shared by the controller and the
sidecars (the node driver itself is privileged).
*/}}
{{- define "leasehold.restrictedContainerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Rules on namespaced objects the controller reconciles. Cluster-wide
(ClusterRoleBinding) by default; with watchNamespaces they are bound by a
RoleBinding in each watched namespace only; with rbac.writeNamespaces the read
rules stay cluster-wide and the write rules are bound per listed namespace.
*/}}
{{- define "leasehold.controllerNamespacedRules" -}}
{{ include "leasehold.controllerReadRules" . }}
{{ include "leasehold.controllerWriteRules" . }}
{{- end }}

{{- define "leasehold.controllerReadRules" -}}
- apiGroups: ["leasehold.dev"]
  resources: ["rotationpolicies", "secretleases"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["leasehold.dev"]
  resources: ["secretleases/status", "rotationpolicies/status"]
  verbs: ["get"]
# Issuers, and the ConfigMaps holding their revocation ledgers and CRLs.
- apiGroups: ["leasehold.dev"]
  resources: ["issuers"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch"]
# Database admin credentials referenced by policies, and the Secrets the
# controller owns (issued credentials, broker TLS).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# The broker checks that the pod a token is bound to exists and is running.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{- define "leasehold.controllerWriteRules" -}}
# The finalizer is added and removed with a patch on the lease itself.
- apiGroups: ["leasehold.dev"]
  resources: ["secretleases"]
  verbs: ["patch"]
# Status of both kinds is written with server-side apply.
- apiGroups: ["leasehold.dev"]
  resources: ["secretleases/status", "rotationpolicies/status", "issuers/status"]
  verbs: ["patch"]
# Revocation ledgers and CRLs of issuers (ConfigMap `<issuer>-crl`).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "update", "patch"]
# For clusters that enforce OwnerReferencesPermissionEnforcement: the owned
# Secrets carry blockOwnerDeletion on their lease.
- apiGroups: ["leasehold.dev"]
  resources: ["secretleases/finalizers"]
  verbs: ["update"]
# `create` also for the CA a selfSigned issuer generates (`<issuer>-ca`).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Rollout restarts of workloads that consume rotated Secrets.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["patch"]
{{- end }}

{{/*
Controller flags for encryption at rest. `--encryption` is always passed, so
that storing secret material unencrypted is a visible, explicit choice.
*/}}
{{- define "leasehold.encryptionArgs" -}}
{{- $enc := .Values.encryption }}
- --encryption
- {{ $enc.mode }}
{{- if eq $enc.mode "kms" }}
{{- if not (trim (default "" $enc.kms.keyId)) }}
{{- fail "encryption.mode is kms: set encryption.kms.keyId to the KMS key id, ARN or alias" }}
{{- end }}
- --kms-key-id
- {{ $enc.kms.keyId | quote }}
{{- with $enc.kms.region }}
- --kms-region
- {{ . | quote }}
{{- end }}
{{- with $enc.kms.endpointUrl }}
- --kms-endpoint-url
- {{ . | quote }}
{{- end }}
{{- else if eq $enc.mode "local" }}
- --local-key-secret
- {{ $enc.local.secretName }}
{{- if $enc.local.create }}
- --local-key-secret-create
{{- end }}
{{- else if ne $enc.mode "none" }}
{{- fail (printf "encryption.mode must be kms, local or none (got %q)" $enc.mode) }}
{{- end }}
{{- if ne $enc.mode "none" }}
- --data-key-cache-ttl-seconds
- {{ $enc.dataKeyCacheTTLSeconds | quote }}
{{- end }}
{{- end }}

{{/*
Controller flags for the audit trail.
*/}}
{{- define "leasehold.auditArgs" -}}
{{- $audit := .Values.audit }}
{{- with $audit.log }}
- --audit-log
- {{ . | quote }}
{{- end }}
{{- with $audit.webhookUrl }}
- --audit-webhook
- {{ . | quote }}
{{- end }}
- --audit-signing-key-secret
- {{ $audit.signingKeySecret }}
- --audit-checkpoint-configmap
- {{ $audit.checkpointConfigMap }}
- --audit-checkpoint-every
- {{ $audit.checkpointEvery | quote }}
{{- end }}

{{/*
Directory of the audit log file, or nothing when the log goes to stdout or is off.
*/}}
{{- define "leasehold.auditLogDir" -}}
{{- $log := .Values.audit.log | default "" }}
{{- if and $log (ne $log "-") }}
{{- if eq (dir $log) "/tmp" }}
{{- fail "audit.log: /tmp is the controller's small in-memory scratch space; use another directory, e.g. /var/log/leasehold/audit.log" }}
{{- end }}
{{- dir $log }}
{{- end }}
{{- end }}

{{/*
Labels of one alert: its severity plus monitoring.prometheusRule.alertLabels.
Call with (dict "ctx" $ "severity" "warning").
*/}}
{{- define "leasehold.alertLabels" -}}
severity: {{ .severity }}
{{- with .ctx.Values.monitoring.prometheusRule.alertLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}
