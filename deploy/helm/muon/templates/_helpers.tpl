{{/*
Muon's names are fixed: sidecars find the control plane at muon-control.muon-system.svc, and
the webhook's certificate is for that name. The chart therefore installs into muon-system only.
*/}}
{{- define "muon.checkNamespace" -}}
{{- if ne .Release.Namespace "muon-system" -}}
{{- fail (printf "Muon installs into the namespace muon-system, not %q: helm install muon deploy/helm/muon -n muon-system --create-namespace" .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{- define "muon.partOf" -}}
app.kubernetes.io/part-of: muon
{{- end -}}

{{- define "muon.selector" -}}
app: muon-control
{{- end -}}

{{- define "muon.controlLabels" -}}
app: muon-control
app.kubernetes.io/name: muon-control
app.kubernetes.io/part-of: muon
{{- end -}}

{{/* The images' tag: image.tag, else the chart's appVersion. */}}
{{- define "muon.tag" -}}
{{- .Values.image.tag | default .Chart.AppVersion -}}
{{- end -}}
