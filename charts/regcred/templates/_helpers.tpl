{{- define "regcred.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "regcred.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "regcred.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "regcred.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "regcred.selectorLabels" -}}
app.kubernetes.io/name: {{ include "regcred.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "regcred.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "regcred.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
What the controller may do to Secrets, ServiceAccounts and their tokens: cluster-wide in the
ClusterRole, or in each of .Values.watchNamespaces through a Role.
*/}}
{{- define "regcred.namespacedRules" }}
  # get/list/watch: a metadata-only watch of the Secrets and reads of referenced ones;
  # create/patch: the managed Secrets (POST, then server-side apply);
  # delete: the Secret under the old name when spec.secret.name changes.
  - apiGroups: [""]
    resources: [secrets]
    verbs: [get, list, watch, create, patch, delete]
  # get: IRSA reads the eks.amazonaws.com/role-arn annotation of the named ServiceAccount;
  # list/watch: ServiceAccounts created later get the Secret too (metadata-only watch);
  # patch: adding and removing regcred's imagePullSecrets entry (merge patch guarded by
  # resourceVersion). No create, update or delete.
  - apiGroups: [""]
    resources: [serviceaccounts]
    verbs: [get, list, watch, patch]
  # get: a registry check's CA bundle (spec.verify.caBundle.configMap), read by name when a
  # check runs. No list or watch.
  - apiGroups: [""]
    resources: [configmaps]
    verbs: [get]
{{- if .Values.irsa.enabled }}
  # IRSA: a TokenRequest for that ServiceAccount, exchanged at STS (AssumeRoleWithWebIdentity).
  # RBAC cannot limit the audience: the ValidatingAdmissionPolicy <fullname>-token-requests
  # admits only irsa.audiences, at most irsa.maxExpirationSeconds, outside kube-system and
  # the release namespace.
  - apiGroups: [""]
    resources: [serviceaccounts/token]
    verbs: [create]
{{- end }}
{{- end }}

{{/*
The Pod admission webhook: its Service, the TLS Secret that holds its serving certificate
(written by the controller, or by cert-manager), and that certificate's DNS names.
*/}}
{{- define "regcred.webhookService" -}}
{{ include "regcred.fullname" . }}-webhook
{{- end }}

{{- define "regcred.webhookSecret" -}}
{{ include "regcred.fullname" . }}-webhook-tls
{{- end }}

{{- define "regcred.webhookHosts" -}}
{{- $svc := printf "%s.%s.svc" (include "regcred.webhookService" .) .Release.Namespace -}}
{{ $svc }},{{ $svc }}.cluster.local
{{- end }}
