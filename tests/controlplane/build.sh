#!/usr/bin/env bash
# Build the test control plane (etcd + kube-apiserver) and helm from Go modules.
#
# Why: the tests need a real API server, and building from the Go module proxy needs
# nothing but a Go toolchain (no release tarballs), so the binaries are built once,
# into a cache outside the repo.
#
# Layout:  ${MELANGE_TEST_BIN:-$HOME/.cache/melange-operator/bin}/<component>-<version>/<binary>
#          ${MELANGE_TEST_BIN}/current/{etcd,kube-apiserver,helm}   (stable symlinks)
# A component whose binary already reports the pinned version is not rebuilt.
#
# Usage:   bash tests/controlplane/build.sh                   # build what is missing
#          bash tests/controlplane/build.sh --print-versions  # KEY=VALUE pins, no build
#
set -euo pipefail

# Pinned versions. Kubernetes 1.34-1.36 pair with etcd 3.6.x (1.37 would need 3.7.x).
# All three have `go 1.26.0` in their go.mod, so they build with a local go1.26.
K8S_VERSION="${K8S_VERSION:-v1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"

if [[ "${1:-}" == "--print-versions" ]]; then
  printf 'K8S_VERSION=%s\nETCD_VERSION=%s\nHELM_VERSION=%s\n' "$K8S_VERSION" "$ETCD_VERSION" "$HELM_VERSION"
  exit 0
fi

BIN_ROOT="${MELANGE_TEST_BIN:-$HOME/.cache/melange-operator/bin}"
# Wrapper modules live outside the repo, next to the binaries' cache, so that their
# go.mod/go.sum can be inspected after a build.
MOD_ROOT="${MELANGE_TEST_GOMOD:-$HOME/.cache/melange-operator/gomod}"

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
# Never download another toolchain: a module that needs a newer Go must fail clearly.
export GOTOOLCHAIN=local
# Static binaries, like the official releases.
export CGO_ENABLED=0
# Memory: at most 2 compile jobs (-p 2) plus the linker; GOMEMLIMIT is a soft cap per
# Go process, which keeps the build well under the machine's 24 GiB.
export GOMEMLIMIT="${GOMEMLIMIT:-6GiB}"
BUILD_FLAGS=(-p 2 -trimpath)

log() { printf '[build.sh] %s\n' "$*" >&2; }

fmt_secs() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# gomod_path MODULE@VERSION -> path of that version's go.mod in the module cache
gomod_path() { (cd / && "$GO" mod download -json "$1" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p'); }
# tag_time MODULE@VERSION -> commit time of the tag, used as a reproducible build date
tag_time() { (cd / && "$GO" list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' "$1"); }

# new_wrapper DIR MODULE@VERSION: a fresh wrapper module whose `go` and `godebug`
# lines copy the target's (a dependency's godebug lines are otherwise ignored).
new_wrapper() {
  local dir="$1" target="$2" gomod go_line
  rm -rf "$dir" && mkdir -p "$dir"
  gomod="$(gomod_path "$target")"
  (cd "$dir" && "$GO" mod init "local.test/$(basename "$dir" | tr -c 'a-zA-Z0-9.\n' '-')" >/dev/null 2>&1)
  go_line="$(awk '$1=="go"{print $2; exit}' "$gomod")"
  (cd "$dir" && "$GO" mod edit -go="$go_line")
  awk '$1=="godebug" && $2!="("{print $2}' "$gomod" | while read -r kv; do
    (cd "$dir" && "$GO" mod edit -godebug="$kv")
  done
  printf '%s\n' "$gomod"
}

# installed BINARY EXPECTED CMD...: true if BINARY exists and CMD's output has the line EXPECTED.
# (Output is captured first: with pipefail, `cmd | grep -q` can fail when grep exits
# early and cmd dies of SIGPIPE.)
installed() {
  local bin="$1" expected="$2" out; shift 2
  [[ -x "$bin" ]] || return 1
  out="$("$@" 2>/dev/null)" || return 1
  grep -qxF -- "$expected" <<<"$out"
}

link_current() {
  mkdir -p "$BIN_ROOT/current"
  ln -sfn "../$1/$2" "$BIN_ROOT/current/$2"
}

declare -A TOOK=()

build_kube_apiserver() {
  local v="$K8S_VERSION" dir="$BIN_ROOT/kube-apiserver-$K8S_VERSION"
  local bin="$dir/kube-apiserver" minor staging wrap gomod date m start
  if installed "$bin" "Kubernetes $v" "$bin" --version; then
    log "kube-apiserver $v: cached ($bin)"; TOOK[kube-apiserver]=cached
    link_current "kube-apiserver-$v" kube-apiserver; return
  fi
  start=$SECONDS
  minor="$(cut -d. -f2 <<<"$v")"
  staging="v0.${v#v1.}"   # v1.36.3 -> v0.36.3 (published staging modules)
  wrap="$MOD_ROOT/kube-apiserver-$v"
  log "kube-apiserver $v: preparing wrapper module in $wrap"
  gomod="$(new_wrapper "$wrap" "k8s.io/kubernetes@$v")"
  date="$(tag_time "k8s.io/kubernetes@$v")"
  # k8s.io/kubernetes requires its ~30 staging modules at v0.0.0 and replaces them with
  # ./staging/... paths, which a dependency cannot use: map each to its published tag.
  # The list comes from the real go.mod so new staging modules are picked up.
  awk '$2=="v0.0.0"{print $1}' "$gomod" | grep '^k8s.io/' | sort -u | while read -r m; do
    (cd "$wrap" && "$GO" mod edit -replace="$m=$m@$staging")
  done
  (cd "$wrap" && GOFLAGS=-mod=mod "$GO" get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$v")
  # Version stamping as hack/lib/version.sh does it; without it /version says
  # v0.0.0-master and Helm's kubeVersion checks break. The commit is unknown from a
  # module zip, so gitCommit is left empty; buildDate is the tag's time.
  local ld=(-s -w)
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=(-X "$p.gitVersion=$v" -X "$p.gitMajor=1" -X "$p.gitMinor=$minor"
         -X "$p.gitTreeState=clean" -X "$p.gitCommit=" -X "$p.buildDate=$date")
  done
  mkdir -p "$dir"
  log "kube-apiserver $v: compiling (cold: ~10-20 min on 2 cores)"
  (cd "$wrap" && GOFLAGS=-mod=mod "$GO" build "${BUILD_FLAGS[@]}" -ldflags "${ld[*]}" \
     -o "$bin.tmp" k8s.io/kubernetes/cmd/kube-apiserver)
  mv "$bin.tmp" "$bin"
  installed "$bin" "Kubernetes $v" "$bin" --version || { log "kube-apiserver: wrong --version: $("$bin" --version)"; return 1; }
  TOOK[kube-apiserver]=$((SECONDS - start))
  log "kube-apiserver $v: built in $(fmt_secs "${TOOK[kube-apiserver]}")"
  link_current "kube-apiserver-$v" kube-apiserver
}

build_etcd() {
  local v="$ETCD_VERSION" dir="$BIN_ROOT/etcd-$ETCD_VERSION"
  local bin="$dir/etcd" wrap start
  if installed "$bin" "etcd Version: ${v#v}" "$bin" --version; then
    log "etcd $v: cached ($bin)"; TOOK[etcd]=cached
    link_current "etcd-$v" etcd; return
  fi
  start=$SECONDS
  wrap="$MOD_ROOT/etcd-$v"
  log "etcd $v: preparing wrapper module in $wrap"
  # server/go.mod keeps `replace ../api` etc. even in tags, so `go install @v` fails; as a
  # dependency its requirements (api, client, pkg at the same tag) resolve without them.
  new_wrapper "$wrap" "go.etcd.io/etcd/server/v3@$v" >/dev/null
  (cd "$wrap" && GOFLAGS=-mod=mod "$GO" get -tool "go.etcd.io/etcd/server/v3@$v")
  mkdir -p "$dir"
  log "etcd $v: compiling"
  # The version string is compiled in; only the git SHA comes from ldflags.
  (cd "$wrap" && GOFLAGS=-mod=mod "$GO" build "${BUILD_FLAGS[@]}" \
     -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=go-module-$v" \
     -o "$bin.tmp" go.etcd.io/etcd/server/v3)
  mv "$bin.tmp" "$bin"
  installed "$bin" "etcd Version: ${v#v}" "$bin" --version || { log "etcd: wrong --version: $("$bin" --version)"; return 1; }
  TOOK[etcd]=$((SECONDS - start))
  log "etcd $v: built in $(fmt_secs "${TOOK[etcd]}")"
  link_current "etcd-$v" etcd
}

build_helm() {
  local v="$HELM_VERSION" dir="$BIN_ROOT/helm-$HELM_VERSION"
  local bin="$dir/helm" wrap start k8s_minor
  k8s_minor="$(cut -d. -f2 <<<"$K8S_VERSION")"
  # The Kubernetes version helm assumes offline is compiled in but not printed by
  # `helm version`, so a marker file records it and is part of the cache check.
  if [[ -x "$bin" ]] && [[ "$("$bin" version --template '{{.Version}}' 2>/dev/null)" == "$v" ]] \
     && [[ -f "$dir/.k8s-v1.$k8s_minor" ]]; then
    log "helm $v: cached ($bin)"; TOOK[helm]=cached
    link_current "helm-$v" helm; return
  fi
  start=$SECONDS
  wrap="$MOD_ROOT/helm-$v"
  log "helm $v: preparing wrapper module in $wrap"
  new_wrapper "$wrap" "helm.sh/helm/v3@$v" >/dev/null
  (cd "$wrap" && GOFLAGS=-mod=mod "$GO" get -tool "helm.sh/helm/v3/cmd/helm@$v")
  # Flags from helm's Makefile. Without k8sVersion*, `helm template`/`helm lint` assume
  # Kubernetes v1.20 and charts with `kubeVersion: >=1.29.0-0` fail to render offline.
  local ld=(-s -w
    -X "helm.sh/helm/v3/internal/version.version=$v"
    -X "helm.sh/helm/v3/internal/version.gitTreeState=clean"
    -X "helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1"
    -X "helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor"
    -X "helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1"
    -X "helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor")
  mkdir -p "$dir"
  log "helm $v: compiling (assumes Kubernetes v1.$k8s_minor offline)"
  (cd "$wrap" && GOFLAGS=-mod=mod "$GO" build "${BUILD_FLAGS[@]}" -ldflags "${ld[*]}" \
     -o "$bin.tmp" helm.sh/helm/v3/cmd/helm)
  mv "$bin.tmp" "$bin"
  rm -f "$dir"/.k8s-v1.*
  touch "$dir/.k8s-v1.$k8s_minor"
  [[ "$("$bin" version --template '{{.Version}}')" == "$v" ]] || { log "helm: wrong version: $("$bin" version)"; return 1; }
  TOOK[helm]=$((SECONDS - start))
  log "helm $v: built in $(fmt_secs "${TOOK[helm]}")"
  link_current "helm-$v" helm
}

main() {
  log "go: $("$GO" env GOVERSION), bin cache: $BIN_ROOT, wrapper modules: $MOD_ROOT"
  local total_start=$SECONDS c
  mkdir -p "$BIN_ROOT" "$MOD_ROOT"
  # Cheapest first, so a failure in the long kube-apiserver build leaves the others usable.
  build_etcd
  build_helm
  build_kube_apiserver
  for c in etcd helm kube-apiserver; do
    if [[ "${TOOK[$c]}" == cached ]]; then log "summary: $c cached"
    else log "summary: $c built in $(fmt_secs "${TOOK[$c]}")"; fi
  done
  log "summary: total $(fmt_secs $((SECONDS - total_start))); binaries:"
  ls -lL "$BIN_ROOT/current/" >&2
}

main "$@"
