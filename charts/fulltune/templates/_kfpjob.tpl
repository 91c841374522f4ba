{{/*
A Job that runs one `fulltune` command against the KFP API as the uploader ServiceAccount, with a
KFP-audience token only (the upload hook and the uninstall hook share it). Parameters: root (the
chart's context), suffix (name and component), hook (Helm hook events), command, args, withFiles
(mount the run configuration and the compiled pipeline), and optionally before (a dict of command
and args: another `fulltune` command run first, as an init container).
*/}}
{{- define "fulltune.kfpJob" -}}
{{- $r := .root }}
{{- $up := $r.Values.pipelineUpload }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "fulltune.fullname" $r }}-{{ .suffix }}
  namespace: {{ $r.Release.Namespace }}
  labels:
    {{- include "fulltune.labels" $r | nindent 4 }}
    app.kubernetes.io/component: pipeline-{{ .suffix }}
  annotations:
    helm.sh/hook: {{ .hook }}
    helm.sh/hook-weight: "0"
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
spec:
  backoffLimit: {{ $up.backoffLimit }}
  activeDeadlineSeconds: {{ $up.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ $up.ttlSecondsAfterFinished }}
  template:
    metadata:
      labels:
        {{- include "fulltune.selectorLabels" $r | nindent 8 }}
        app.kubernetes.io/component: pipeline-{{ .suffix }}
      annotations:
        checksum/config: {{ include "fulltune.runConfig" $r | sha256sum }}
        {{- with $up.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "fulltune.uploaderServiceAccountName" $r }}
      # No Kubernetes API token: the only credential is the KFP-audience token below.
      automountServiceAccountToken: false
      restartPolicy: Never
      securityContext:
        {{- include "fulltune.podSecurityContext" $r | nindent 8 }}
      {{- with $r.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- range . }}
        - name: {{ . }}
        {{- end }}
      {{- end }}
      {{- with $up.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $up.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .before }}
      initContainers:
        {{- include "fulltune.kfpContainer" (dict "root" $r "name" .command "command" .command "args" .args "withFiles" false) | nindent 8 }}
      {{- end }}
      containers:
        {{- include "fulltune.kfpContainer" (dict "root" $r "name" .suffix "command" .command "args" .args "withFiles" .withFiles) | nindent 8 }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 256Mi
        # A short-lived token for the KFP API only (audience pipelines.kubeflow.org), rotated by the kubelet.
        - name: kfp-token
          projected:
            sources:
              - serviceAccountToken:
                  path: token
                  audience: {{ $up.tokenAudience }}
                  expirationSeconds: 3600
        {{- if .withFiles }}
        - name: config
          configMap:
            name: {{ include "fulltune.fullname" $r }}-config
        - name: pipeline
          configMap:
            name: {{ include "fulltune.fullname" $r }}-pipeline
        {{- end }}
{{- end }}

{{/* The container of a KFP Job (fulltune.kfpJob): one `fulltune` command as the uploader, with the
KFP-audience token. Parameters: root, name, command, args, withFiles. */}}
{{- define "fulltune.kfpContainer" -}}
{{- $r := .root }}
- name: {{ .name }}
  image: {{ include "fulltune.image" (list $r.Values.images.runtime $r) }}
  imagePullPolicy: {{ $r.Values.images.runtime.pullPolicy }}
  command: ["fulltune", {{ .command | quote }}]
  args:
    {{- range .args }}
    - {{ . | quote }}
    {{- end }}
  env:
    # Multi-user KFP: the profile namespace the pipeline, experiment and runs belong to.
    - name: KFP_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    # The runs' pods use the ServiceAccount the launcher Role is bound to (else KFP's default
    # account, which may not create PyTorchJobs).
    - name: FULLTUNE_SERVICE_ACCOUNT
      value: {{ include "fulltune.serviceAccountName" $r | quote }}
    - name: KF_PIPELINES_SA_TOKEN_PATH
      value: /var/run/secrets/kubeflow/pipelines/token
    # The root filesystem is read-only; kfp keeps its context under $HOME.
    - name: HOME
      value: /tmp
  securityContext:
    {{- include "fulltune.containerSecurityContext" $r | nindent 4 }}
  {{- with $r.Values.pipelineUpload.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: kfp-token
      mountPath: /var/run/secrets/kubeflow/pipelines
      readOnly: true
    {{- if .withFiles }}
    - name: config
      mountPath: /etc/fulltune/config
      readOnly: true
    - name: pipeline
      mountPath: /etc/fulltune/pipeline
      readOnly: true
    {{- end }}
{{- end -}}
