{{/*
Names, labels and shared pod fragments of the specfleet chart. The label and port contract with the operator is
docs/kubernetes.md: the operator labels role pods with app.kubernetes.io/name=specfleet and
app.kubernetes.io/instance=<fleet>, and the fleet is named after the release, so one selector
(specfleet.releasePodSelector) matches every pod of the release: the chart's and the operator's.
*/}}

{{- define "specfleet.name" -}}
specfleet
{{- end }}

{{/* Prefix of the chart's own objects: the release name, or "<release>-specfleet" when it lacks the chart name. */}}
{{- define "specfleet.fullname" -}}
{{- if contains "specfleet" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-specfleet" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{/*
The SpecFleet resource's name. The operator names its objects <fleet>-drafter-<pool> (Services: DNS-1035 labels
of at most 63 characters), so the release name must start with a letter and leave room for the longest suffix.
*/}}
{{- define "specfleet.fleetName" -}}
{{- $name := .Release.Name -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "release name %q must start with a letter and hold only a-z, 0-9 and '-' (it names the SpecFleet and its Services); install under another name" $name) -}}
{{- end -}}
{{- $longestPool := 0 -}}
{{- range .Values.drafter -}}
{{- if gt (len .name) $longestPool -}}{{- $longestPool = len .name -}}{{- end -}}
{{- end -}}
{{- if gt (add (len $name) (len "-drafter-") $longestPool) 63 -}}
{{- fail (printf "release name %q is too long: %s-drafter-<pool> must fit in 63 characters; use a shorter release name or pool names" $name $name) -}}
{{- end -}}
{{- $name -}}
{{- end }}

{{- define "specfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* Labels on every object the chart creates. */}}
{{- define "specfleet.labels" -}}
helm.sh/chart: {{ include "specfleet.chart" . }}
app.kubernetes.io/name: {{ include "specfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: specfleet
{{- end }}

{{/* Selects every pod of this release: the chart's (operator, Redis, helm test) and the operator's role pods. */}}
{{- define "specfleet.releasePodSelector" -}}
app.kubernetes.io/name: {{ include "specfleet.name" . }}
app.kubernetes.io/instance: {{ include "specfleet.fleetName" . }}
{{- end }}

{{/* Selector labels of one chart-owned component; call with (dict "root" $ "component" "redis"). */}}
{{- define "specfleet.componentSelector" -}}
{{ include "specfleet.releasePodSelector" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Selector of one role's pods created by the operator; call with (dict "root" $ "component" "router"). */}}
{{- define "specfleet.roleSelector" -}}
{{ include "specfleet.releasePodSelector" .root }}
app.kubernetes.io/component: {{ .component }}
specfleet.io/fleet: {{ include "specfleet.fleetName" .root }}
{{- end }}

{{- define "specfleet.image" -}}
{{- include "specfleet.imageRef" (dict "image" .Values.image "tag" (default .Chart.AppVersion .Values.image.tag)) -}}
{{- end }}

{{/* repository@digest when the image values give a digest, else repository:tag; call with (dict "image" I "tag" T). */}}
{{- define "specfleet.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository .tag -}}
{{- end -}}
{{- end }}

{{/*
checkov annotations for the policy checks an object knowingly fails, each with its one-line reason (no "=" in a
reason: checkov splits on it): those of the image values (no digest, a pull policy other than Always) and .skips, a
dict of check id -> reason; .key names the image values in reasons (default "image"). One key per check. Renders
nothing when nothing is skipped. Call with (dict "image" .Values.image "skips" (dict "CKV_K8S_38" "why")). docs/kubernetes.md#policy-scan lists them.
*/}}
{{- define "specfleet.policySkips" -}}
{{- $skips := deepCopy (.skips | default dict) -}}
{{- if not .image.digest -}}
{{- $_ := set $skips "CKV_K8S_43" (printf "no %s.digest set (unknown before the image is published)" (.key | default "image")) -}}
{{- end -}}
{{- if ne .image.pullPolicy "Always" -}}
{{- $_ := set $skips "CKV_K8S_15" "pullPolicy is a value; with a digest IfNotPresent cannot go stale" -}}
{{- end -}}
{{- range $check := keys $skips | sortAlpha }}
checkov.io/skip-{{ $check }}: {{ printf "%s=%s" $check (index $skips $check) | quote }}
{{- end -}}
{{- end }}

{{- define "specfleet.serviceAccountName" -}}
{{- printf "%s-operator" (include "specfleet.fullname" .) -}}
{{- end }}

{{- define "specfleet.redisHost" -}}
{{- printf "%s-redis" (include "specfleet.fullname" .) -}}
{{- end }}

{{/* The Secret and key that hold the Redis URL every pod reads from the file SPECFLEET_REDIS_URL_FILE names. */}}
{{- define "specfleet.redisUrlSecretName" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret.name -}}
{{- .Values.redis.external.existingSecret.name -}}
{{- else -}}
{{- printf "%s-redis" (include "specfleet.fullname" .) -}}
{{- end -}}
{{- end }}

{{- define "specfleet.redisUrlSecretKey" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret.name -}}
{{- .Values.redis.external.existingSecret.key -}}
{{- else -}}
url
{{- end -}}
{{- end }}

{{/* The Secret and key of the router's public bearer token; empty name when auth is off. */}}
{{- define "specfleet.authSecretName" -}}
{{- if .Values.auth.enabled -}}
{{- default (printf "%s-auth" (include "specfleet.fullname" .)) .Values.auth.existingSecret.name -}}
{{- end -}}
{{- end }}

{{- define "specfleet.authSecretKey" -}}
{{- if .Values.auth.existingSecret.name -}}
{{- .Values.auth.existingSecret.key -}}
{{- else -}}
token
{{- end -}}
{{- end }}

{{/*
A value kept across upgrades: the stored one when the Secret already exists (lookup returns nothing under
`helm template`), else a new random one. Call with (dict "root" $ "secret" NAME "key" KEY "length" N).
*/}}
{{- define "specfleet.stableRandom" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum (int .length) -}}
{{- end -}}
{{- end }}

{{- define "specfleet.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "specfleet.securityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end }}

{{/* nodeSelector / tolerations / affinity of a component's values; call with the component's values. */}}
{{- define "specfleet.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Checks what values.schema.json cannot express: minReplicas <= maxReplicas per role, unique drafter pool names, and
with models.drafters unique drafter names and pools named after a declared drafter (or suffix / ngram), and a pool
named head only with models.head and no model, as the operator checks them too. Renders nothing; fails the install with a message naming the value to fix.
*/}}
{{- define "specfleet.checkRoles" -}}
{{- $roles := dict "router" .Values.router "fusion" .Values.fusion "verifier" .Values.verifier -}}
{{- range $i, $pool := .Values.drafter -}}
{{- $_ := set $roles (printf "drafter[%d] (%s)" $i $pool.name) $pool -}}
{{- end -}}
{{- range $where, $role := $roles -}}
{{- if gt (int $role.minReplicas) (int $role.maxReplicas) -}}
{{- fail (printf "%s: minReplicas (%d) must be <= maxReplicas (%d)" $where (int $role.minReplicas) (int $role.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- $seen := dict -}}
{{- range .Values.drafter -}}
{{- if hasKey $seen .name -}}
{{- fail (printf "drafter: pool name %q appears twice; each pool needs its own name" .name) -}}
{{- end -}}
{{- $_ := set $seen .name true -}}
{{- end -}}
{{- $declared := dict -}}
{{- range (.Values.models.drafters | default list) -}}
{{- if hasKey $declared .name -}}
{{- fail (printf "models.drafters: drafter name %q appears twice; each drafter needs its own name" .name) -}}
{{- end -}}
{{- $_ := set $declared .name .path -}}
{{- end -}}
{{- $head := .Values.models.head | default "" -}}
{{- range .Values.drafter -}}
{{- if eq .name "head" -}}
{{- if not $head -}}
{{- fail "drafter: pool \"head\" serves the draft head, but models.head is not set: set it to the head's folder under models.path (head for the bundled layout's head/, where `specfleet train head` puts it), or remove the pool" -}}
{{- end -}}
{{- if .model -}}
{{- fail (printf "drafter: pool \"head\" sets model %q; it serves models.head (%s): remove model" .model $head) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $declared -}}
{{- range .Values.drafter -}}
{{- if ne .name "head" -}}
{{- if not (or (hasKey $declared .name) (has .name (list "suffix" "ngram"))) -}}
{{- fail (printf "drafter: pool %q names no drafter of models.drafters (%s) and no model-free pool (suffix, ngram); declare it there or name the pool after a declared drafter" .name (keys $declared | sortAlpha | join ", ")) -}}
{{- end -}}
{{- if .model -}}
{{- fail (printf "drafter: pool %q sets model %q; with models.drafters a pool takes its drafter's folder from there by its name: remove model" .name .model) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/*
The kubernetes.io/tls Secret of the internal mTLS (empty when tls.internal is off): existingSecret, else the one the
chart's cert-manager Certificate writes. Fails when mTLS is on with neither.
*/}}
{{- define "specfleet.internalTlsSecretName" -}}
{{- $tls := .Values.tls.internal -}}
{{- if $tls.enabled -}}
{{- if $tls.existingSecret -}}
{{- $tls.existingSecret -}}
{{- else if and $tls.certManager.enabled $tls.certManager.issuerRef.name -}}
{{- printf "%s-internal-tls" (include "specfleet.fullname" .) -}}
{{- else -}}
{{- fail "tls.internal.enabled needs a certificate: set tls.internal.existingSecret to a kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt), or tls.internal.certManager.enabled=true with tls.internal.certManager.issuerRef.name" -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The DNS name the router checks on the internal certificates. */}}
{{- define "specfleet.internalTlsServerName" -}}
{{- default (printf "%s-internal" (include "specfleet.fleetName" .)) .Values.tls.internal.serverName -}}
{{- end }}
