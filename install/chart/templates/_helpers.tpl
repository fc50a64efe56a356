{{/*
The image every container runs.
*/}}
{{- define "ambient.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

{{/*
Where the node's container runtime reads CNI plugins: cniBinDir, else the platform's place,
else /opt/cni/bin.
*/}}
{{- define "ambient.cniBinDir" -}}
{{- if .Values.cniBinDir -}}
{{ .Values.cniBinDir }}
{{- else if eq .Values.platform "k3s" -}}
/var/lib/rancher/k3s/data/current/bin
{{- else if eq .Values.platform "gke" -}}
/home/kubernetes/bin
{{- else if eq .Values.platform "" -}}
/opt/cni/bin
{{- else -}}
{{ fail (printf "platform %q: must be empty, k3s or gke" .Values.platform) }}
{{- end -}}
{{- end }}

{{/*
Where it reads CNI network configurations: cniConfDir, else the platform's place, else
/etc/cni/net.d.
*/}}
{{- define "ambient.cniConfDir" -}}
{{- if .Values.cniConfDir -}}
{{ .Values.cniConfDir }}
{{- else if eq .Values.platform "k3s" -}}
/var/lib/rancher/k3s/agent/etc/cni/net.d
{{- else -}}
/etc/cni/net.d
{{- end -}}
{{- end }}
