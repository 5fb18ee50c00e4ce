{{/*
The product's name, shortened to the 63 characters of a label value. Not .Chart.Name: the chart
is published as `beamlit-controller-chart` (the README installs
oci://ghcr.io/beamlit/beamlit-controller-chart), its objects are named `beamlit-controller`.
*/}}
{{- define "beamlit.name" -}}
{{- default "beamlit-controller" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Prefix of every object: the release name when it already contains the chart name (the README's
`helm install beamlit-controller ...` gives `beamlit-controller`), else `<release>-<chart>`.
*/}}
{{- define "beamlit.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "beamlit.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels every object of the chart carries. */}}
{{- define "beamlit.labels" -}}
app.kubernetes.io/name: {{ include "beamlit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component (`controller`, `agent`, `metrics-server`). */}}
{{- define "beamlit.selectorLabels" -}}
app.kubernetes.io/name: {{ include "beamlit.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The chart's labels plus the component's (the selector labels are a subset of these). */}}
{{- define "beamlit.componentLabels" -}}
{{ include "beamlit.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "beamlit.controller.name" -}}{{ include "beamlit.fullname" . }}{{- end -}}
{{- define "beamlit.agent.name" -}}{{ include "beamlit.fullname" . }}-agent{{- end -}}
{{- define "beamlit.metricsServer.name" -}}{{ include "beamlit.fullname" . }}-metrics-server{{- end -}}

{{/* The Secret holding the default remote backend's client secret and the Beamlit API token. */}}
{{- define "beamlit.credentialsSecret" -}}
{{- if .Values.existingSecret -}}
{{- .Values.existingSecret -}}
{{- else -}}
{{- include "beamlit.fullname" . }}-credentials
{{- end -}}
{{- end -}}

{{/* Whether the chart makes the credentials Secret (something to put in it, no existingSecret). */}}
{{- define "beamlit.createSecret" -}}
{{- $oauth := .Values.config.defaultRemoteBackend.authConfig.oauthConfig -}}
{{- if and (not .Values.existingSecret) (or $oauth.clientSecret .Values.beamlitApiToken) -}}
true
{{- end -}}
{{- end -}}

{{/* Whether the default remote backend authenticates (an OAuth client id is given). */}}
{{- define "beamlit.defaultBackendAuth" -}}
{{- if and .Values.config.defaultRemoteBackend.enabled .Values.config.defaultRemoteBackend.authConfig.oauthConfig.clientId -}}
true
{{- end -}}
{{- end -}}

{{/* Whether the controller gets the Beamlit API token (given, or in existingSecret). */}}
{{- define "beamlit.apiToken" -}}
{{- if or .Values.beamlitApiToken (and .Values.existingSecret .Values.existingSecretKeys.beamlitApiToken) -}}
true
{{- end -}}
{{- end -}}

{{- define "beamlit.controller.image" -}}
{{- $image := .Values.controllerManager.manager.image -}}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag | toString) -}}
{{- end -}}

{{- define "beamlit.agent.image" -}}
{{- $image := .Values.agent.image -}}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag | toString) -}}
{{- end -}}

{{- define "beamlit.agent.priorityClassName" -}}
{{- if .Values.agent.priorityClassName -}}
{{- .Values.agent.priorityClassName -}}
{{- else if .Values.agent.priorityClass.create -}}
{{- include "beamlit.agent.name" . -}}
{{- end -}}
{{- end -}}

{{/* Prometheus URL: prometheusUrl, else the earlier chart's metricInformer. */}}
{{- define "beamlit.prometheusUrl" -}}
{{- if .Values.config.prometheusUrl -}}
{{- .Values.config.prometheusUrl -}}
{{- else if eq .Values.config.metricInformer.type "prometheus" -}}
{{- required "config.metricInformer.prometheus.address is required when config.metricInformer.type is prometheus" .Values.config.metricInformer.prometheus.address -}}
{{- end -}}
{{- end -}}

{{/*
The controller's configuration file (`beamlit-controller --config`). Built as a dict and written
with toYaml, so that every value is quoted as YAML needs. Keys are the ones controller/src/config.rs
accepts; the tests feed this file to `beamlit-controller --check-config`.
*/}}
{{- define "beamlit.controller.config" -}}
{{- $c := .Values.config -}}
{{- $file := dict
  "stabilizationWindowSeconds" (int $c.stabilizationWindowSeconds)
  "resyncSeconds" (int $c.resyncSeconds)
  "httpAddr" (printf "0.0.0.0:%d" (int $c.httpPort))
  "agentNamespace" .Release.Namespace
  "leaderElection" (dict
    "enabled" $c.leaderElection.enabled
    "namespace" .Release.Namespace
    "name" (include "beamlit.controller.name" .)
    "leaseDurationSeconds" (int $c.leaderElection.leaseDurationSeconds))
-}}
{{- with (include "beamlit.prometheusUrl" .) }}{{ $_ := set $file "prometheusUrl" . }}{{ end -}}
{{- /* The boundary (controller/src/admission.rs): this release's own Services are protected. */ -}}
{{- $protected := list (printf "%s/%s-metrics" .Release.Namespace (include "beamlit.controller.name" .)) -}}
{{- if .Values.installMetricServer -}}
{{- $protected = append $protected (printf "%s/%s" .Release.Namespace (include "beamlit.metricsServer.name" .)) -}}
{{- end -}}
{{- $_ := set $file "protectedServices" (concat $protected $c.protectedServices) -}}
{{- with $c.allowedRemoteHosts }}{{ $_ := set $file "allowedRemoteHosts" . }}{{ end -}}
{{- if $c.allowInsecureTokenUrls }}{{ $_ := set $file "allowInsecureTokenUrls" true }}{{ end -}}
{{- with .Values.allowedNamespaces }}{{ $_ := set $file "namespaces" . }}{{ end -}}
{{- with $c.workspace }}{{ $_ := set $file "workspace" . }}{{ end -}}
{{- /* The controller refuses beamlitApi without a workspace (the models' workspace). */ -}}
{{- if and (include "beamlit.apiToken" .) $c.workspace -}}
{{- $api := dict "baseUrl" .Values.beamlitBaseUrl "tokenFile" "/etc/beamlit/api/beamlitApiToken" -}}
{{- if .Values.beamlitApiCaBundle }}{{ $_ := set $api "caFile" "/etc/beamlit/api-ca/ca.pem" }}{{ end -}}
{{- $_ := set $file "beamlitApi" $api -}}
{{- end -}}
{{- $b := $c.defaultRemoteBackend -}}
{{- if $b.enabled -}}
{{- $backend := dict "host" $b.host "scheme" $b.scheme "pathPrefix" $b.pathPrefix -}}
{{- with $b.headersToAdd }}{{ $_ := set $backend "headersToAdd" . }}{{ end -}}
{{- if include "beamlit.defaultBackendAuth" . -}}
{{- $o := $b.authConfig.oauthConfig -}}
{{- $_ := set $backend "authConfig" (dict
  "type" $b.authConfig.type
  "oauthConfig" (dict
    "clientId" $o.clientId
    "tokenUrl" $o.tokenUrl
    "clientSecretRef" (dict
      "namespace" .Release.Namespace
      "name" (include "beamlit.credentialsSecret" .)
      "key" .Values.existingSecretKeys.clientSecret))) -}}
{{- end -}}
{{- $_ := set $file "defaultRemoteBackend" $backend -}}
{{- end -}}
{{- toYaml $file -}}
{{- end -}}

{{/* Checks that fail the install with a message instead of rendering something broken. */}}
{{- define "beamlit.validate" -}}
{{- $o := .Values.config.defaultRemoteBackend.authConfig.oauthConfig -}}
{{- if and (include "beamlit.defaultBackendAuth" .) (not $o.clientSecret) (not .Values.existingSecret) -}}
{{- fail "config.defaultRemoteBackend.authConfig.oauthConfig.clientId is set but there is no client secret: set config.defaultRemoteBackend.authConfig.oauthConfig.clientSecret, or existingSecret" -}}
{{- end -}}
{{- if and (include "beamlit.defaultBackendAuth" .) (hasPrefix "http://" $o.tokenUrl) (not .Values.config.allowInsecureTokenUrls) -}}
{{- fail "config.defaultRemoteBackend.authConfig.oauthConfig.tokenUrl must be an https URL (the client secret is sent there); set config.allowInsecureTokenUrls=true only for a test backend" -}}
{{- end -}}
{{- if and $o.clientSecret (not $o.clientId) -}}
{{- fail "config.defaultRemoteBackend.authConfig.oauthConfig.clientSecret is set without clientId" -}}
{{- end -}}
{{- with .Values.beamlitApiToken -}}
{{- /* What the controller's parse_api_token accepts: base64 of `id:secret`, a non-empty id. */ -}}
{{- /* sprig's b64dec returns an error text for invalid input: the round trip catches that. */ -}}
{{- $token := trim . -}}
{{- $decoded := b64dec $token -}}
{{- if or (ne (b64enc $decoded) $token) (not (regexMatch "(?s)^[^:]+:.+$" $decoded)) -}}
{{- fail "beamlitApiToken must be base64 of `clientId:clientSecret` (echo -n $CLIENT_ID:$CLIENT_SECRET | base64)" -}}
{{- end -}}
{{- end -}}
{{- if not (regexMatch "^https?://" .Values.beamlitBaseUrl) -}}
{{- fail "beamlitBaseUrl must be an http:// or https:// URL" -}}
{{- end -}}
{{- if and (gt (int .Values.controllerManager.replicas) 1) (not .Values.config.leaderElection.enabled) -}}
{{- fail "controllerManager.replicas > 1 needs config.leaderElection.enabled: two controllers would both decide" -}}
{{- end -}}
{{- end -}}

{{/*
`beamlit-agent run` arguments, shared by the DaemonSet and the helm test (which adds
--check-config), so that the test checks exactly what the agents run with. $(HOST_IP) is expanded
by the kubelet from the environment below.
*/}}
{{- define "beamlit.agent.args" -}}
{{- $a := .Values.agent -}}
- run
# The node's cgroup hierarchy (hostPaths.cgroup2; its `unified` subdirectory on hybrid nodes);
# the programs attach to the pods' cgroup in it (found from this pod's own, POD_UID), or to its
# root with attachTo=node.
- --cgroup-root=/run/beamlit/cgroup2
- --attach-to={{ $a.attachTo }}
- --tunnel-ipv4=$(HOST_IP):{{ $a.tunnelPort }}
# The tunnel runs in the pod's `tunnel` container (beamlit.agent.tunnelArgs), driven here.
- --tunnel-socket=/run/beamlit-tunnel/control.sock
- --metrics-addr=127.0.0.1:{{ $a.metricsPort }}
- --bypass-mark={{ $a.bypassMark }}
- --failover-hold-ms={{ int $a.failoverHoldMs }}
# The controller's pods on this node are never redirected (nor this agent's own pod).
- --exempt-pods=app.kubernetes.io/name={{ include "beamlit.name" . }},app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/component=controller
- --ebpf-log-level={{ $a.ebpfLogLevel }}
{{- with .Values.allowedNamespaces }}
- --model-namespaces={{ join "," . }}
{{- end }}
{{- if $a.caBundle }}
- --ca-file=/etc/beamlit/ca/ca.pem
{{- end }}
{{- with $a.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The tunnel container's arguments: `beamlit-agent tunnel`, listening for the agent. */}}
{{- define "beamlit.agent.tunnelArgs" -}}
{{- $a := .Values.agent -}}
- tunnel
- --control-socket=/run/beamlit-tunnel/control.sock
- --metrics-addr=$(HOST_IP):{{ $a.tunnelMetricsPort }}
- --header-timeout-ms={{ int $a.tunnelLimits.headerTimeoutMs }}
- --idle-timeout-ms={{ int $a.tunnelLimits.idleTimeoutMs }}
- --max-connections-per-client={{ int $a.tunnelLimits.maxConnectionsPerClient }}
{{- if $a.caBundle }}
- --ca-file=/etc/beamlit/ca/ca.pem
{{- end }}
{{- end -}}

{{/* The agent's environment (see beamlit.agent.args). */}}
{{- define "beamlit.agent.env" -}}
# This node's Lease is beamlit-agent-<node>.
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
# Where the agents' Leases live (the controller's agentNamespace).
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
# This pod's cgroup leads to the node's pods cgroup (--attach-to pods).
- name: POD_UID
  valueFrom:
    fieldRef:
      fieldPath: metadata.uid
# Its deletion (helm uninstall) makes the stopping agents detach and unpin.
- name: AGENT_DAEMONSET
  value: {{ include "beamlit.agent.name" . | quote }}
# Through the environment rather than flags, so that `beamlit-agent inspect`
# (kubectl exec) finds the same pins and state.
- name: BEAMLIT_BPFFS_DIR
  value: /run/beamlit/bpffs/beamlit
- name: BEAMLIT_STATE_DIR
  value: /run/beamlit-agent
- name: RUST_LOG
  value: {{ .Values.agent.logLevel | quote }}
{{- with .Values.agent.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
