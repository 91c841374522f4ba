{{/* Names ------------------------------------------------------------------------------------- */}}

{{- define "fulltune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "fulltune.fullname" -}}
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

{{- define "fulltune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fulltune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fulltune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fulltune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fulltune
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "fulltune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fulltune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fulltune.uploaderServiceAccountName" -}}
{{- $sa := .Values.pipelineUpload.serviceAccount -}}
{{- if $sa.create -}}
{{- default (printf "%s-uploader" (include "fulltune.fullname" .) | trunc 63 | trimSuffix "-") $sa.name -}}
{{- else -}}
{{- required "pipelineUpload.serviceAccount.name is required when pipelineUpload.serviceAccount.create is false" $sa.name -}}
{{- end -}}
{{- end -}}

{{- define "fulltune.claimName" -}}
{{- default (printf "%s-work" (include "fulltune.fullname" .) | trunc 63 | trimSuffix "-") .Values.workDir.pvc.existingClaim -}}
{{- end -}}

{{- define "fulltune.podDefaultName" -}}
{{- default (printf "%s-s3" (include "fulltune.fullname" .) | trunc 63 | trimSuffix "-") .Values.podDefault.name -}}
{{- end -}}

{{/* An image reference from {repository, tag, digest}; the tag defaults to the appVersion. */}}
{{- define "fulltune.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The default RunConfig: what the chart knows (launcher, runtime, trainer image, S3 Secret, volume)
     under the user's runConfig, which wins key by key; refused where it contradicts the chart. */}}
{{- define "fulltune.runConfig" -}}
{{- $k8s := dict "image" (include "fulltune.image" (list .Values.images.trainer .)) -}}
{{- if .Values.s3.existingSecret -}}
{{- $_ := set $k8s "secret_env" (list .Values.s3.existingSecret) -}}
{{- end -}}
{{- if .Values.workDir.pvc.enabled -}}
{{- $_ := set $k8s "volumes" (list (dict "claim_name" (include "fulltune.claimName" .) "mount_path" .Values.workDir.pvc.mountPath)) -}}
{{- end -}}
{{- $resources := dict "launcher" .Values.training.launcher "kubernetes" $k8s -}}
{{- if eq .Values.training.launcher "trainjob" -}}
{{- /* a run started from the UI uses the runtime this release installs (or names) */ -}}
{{- $_ := set $resources "trainjob" (dict "runtime" .Values.trainJob.runtime.name "runtime_kind" .Values.trainJob.runtime.kind) -}}
{{- end -}}
{{- $config := mustMergeOverwrite (dict "resources" $resources) (deepCopy .Values.runConfig) -}}
{{- include "fulltune.checkRunConfig" (list $config .) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* What the merged RunConfig may not say: a cluster launcher other than the one the Role serves, a
     runtime other than the one the Role may read, or (launcher trainjob) pod settings a TrainJob
     cannot carry (fulltune.launch.trainjob.unsupported), which belong to trainJob.runtime. */}}
{{- define "fulltune.checkRunConfig" -}}
{{- $resources := (index . 0).resources -}}
{{- $values := (index . 1).Values -}}
{{- if and (has $resources.launcher (list "kubernetes" "trainjob")) (ne $resources.launcher $values.training.launcher) -}}
{{- fail (printf "runConfig.resources.launcher is %s but training.launcher is %s (what the launcher Role serves): set training.launcher: %s instead" $resources.launcher $values.training.launcher $resources.launcher) -}}
{{- end -}}
{{- if eq $resources.launcher "trainjob" -}}
{{- $runtime := $values.trainJob.runtime -}}
{{- if or (ne $resources.trainjob.runtime $runtime.name) (ne $resources.trainjob.runtime_kind $runtime.kind) -}}
{{- fail "runConfig.resources.trainjob names another runtime than trainJob.runtime, the one the launcher Role may read: set trainJob.runtime.name and .kind instead (create: false for a runtime the chart does not install)" -}}
{{- end -}}
{{- $k8s := $resources.kubernetes -}}
{{- range $field, $value := dict "affinity" "affinity" "priority_class_name" "priorityClassName" "istio_sidecar" "istioSidecar" "active_deadline_seconds" "activeDeadlineSeconds" -}}
{{- if index $k8s $field -}}
{{- fail (printf "runConfig.resources.kubernetes.%s: a TrainJob (training.launcher: trainjob) has no place for it; set trainJob.runtime.%s instead" $field $value) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The training pods the NetworkPolicy isolates: networkPolicy.trainingPodSelector, or those of
     training.launcher's jobs: fulltune's labels (the launcher puts them on a PyTorchJob's pods, the
     chart's runtime on a TrainJob's) and the label the job's controller adds to every pod it makes,
     so that a pod is selected only once it belongs to a job. */}}
{{- define "fulltune.trainingPodSelector" -}}
{{- if .Values.networkPolicy.trainingPodSelector -}}
{{- toYaml .Values.networkPolicy.trainingPodSelector -}}
{{- else -}}
matchLabels:
  {{- include "fulltune.trainingPodLabels" . | nindent 2 }}
matchExpressions:
  - key: {{ ternary "jobset.sigs.k8s.io/jobset-name" "training.kubeflow.org/job-name" (eq .Values.training.launcher "trainjob") }}
    operator: Exists
{{- end -}}
{{- end -}}

{{/* The labels of fulltune's training pods (fulltune.launch.pytorchjob and the chart's runtime). */}}
{{- define "fulltune.trainingPodLabels" -}}
app.kubernetes.io/name: fulltune
app.kubernetes.io/component: train
{{- end -}}

{{/* Pod Security "restricted": pod level. */}}
{{- define "fulltune.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurityContext }}
{{- if not (kindIs "invalid" .runAsUser) }}
runAsUser: {{ .runAsUser }}
{{- end }}
{{- if not (kindIs "invalid" .runAsGroup) }}
runAsGroup: {{ .runAsGroup }}
{{- end }}
{{- if not (kindIs "invalid" .fsGroup) }}
fsGroup: {{ .fsGroup }}
{{- end }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Pod Security "restricted": container level, with a read-only root filesystem. */}}
{{- define "fulltune.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The accounts the launcher's permissions are bound to. */}}
{{- define "fulltune.launcherSubjects" -}}
- kind: ServiceAccount
  name: {{ include "fulltune.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- range .Values.rbac.extraServiceAccounts }}
- kind: ServiceAccount
  name: {{ . }}
  namespace: {{ $.Release.Namespace }}
{{- end }}
{{- end -}}

{{/* The cluster-wide reader of the ClusterTrainingRuntime: one per release and namespace. */}}
{{- define "fulltune.runtimeReaderName" -}}
{{- printf "%s-%s-runtime-reader" .Release.Namespace (include "fulltune.fullname" .) | trunc 253 | trimSuffix "-" -}}
{{- end -}}
