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

{{/* The default RunConfig: what the chart knows (trainer image, S3 Secret, volume) under the
     user's runConfig, which wins key by key. */}}
{{- define "fulltune.runConfig" -}}
{{- $k8s := dict "image" (include "fulltune.image" (list .Values.images.trainer .)) -}}
{{- if .Values.s3.existingSecret -}}
{{- $_ := set $k8s "secret_env" (list .Values.s3.existingSecret) -}}
{{- end -}}
{{- if .Values.workDir.pvc.enabled -}}
{{- $_ := set $k8s "volumes" (list (dict "claim_name" (include "fulltune.claimName" .) "mount_path" .Values.workDir.pvc.mountPath)) -}}
{{- end -}}
{{- $chart := dict "resources" (dict "launcher" "kubernetes" "kubernetes" $k8s) -}}
{{- toYaml (mustMergeOverwrite $chart (deepCopy .Values.runConfig)) -}}
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
