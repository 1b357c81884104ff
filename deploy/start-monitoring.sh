#!/usr/bin/env bash
# Prometheus and Grafana for an opsd Ray cluster, on its head node, wired to the Ray dashboard:
#
#   bash deploy/start-monitoring.sh      # after `ray start --head` (the cluster YAMLs' head_start_ray_commands run it)
#
# - Prometheus (127.0.0.1:9090) scrapes every Ray node with deploy/prometheus/prometheus.yml, i.e. through the
#   service-discovery file that Ray's head keeps up to date as the autoscaler adds and removes nodes.
# - Grafana (127.0.0.1:3000) starts from the provisioning Ray writes for its session (Ray's own dashboards and a
#   Prometheus data source at RAY_PROMETHEUS_HOST), plus deploy/grafana/opsd-dashboard.json ("opsd training").
# - The Ray dashboard's Metrics view embeds them when the head was started with RAY_GRAFANA_HOST and
#   RAY_PROMETHEUS_HOST set (the cluster YAMLs do). Both bind to 127.0.0.1: reach them through
#   `ray attach CLUSTER.yaml -p 3000 -p 9090` (Grafana allows anonymous viewers, as Ray configures it).
#
# The first run downloads pinned releases into ~/.opsd-monitoring (the head needs internet); later runs reuse them
# and restart what an earlier run started. Environment overrides: PROMETHEUS_BIN / GRAFANA_HOME (use installed
# copies), PROMETHEUS_VERSION, GRAFANA_VERSION, RAY_TMP_DIR (ray start --temp-dir), OPSD_MONITORING_DIR,
# PROMETHEUS_PORT, GRAFANA_PORT, SKIP_GRAFANA=1.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RAY_TMP="${RAY_TMP_DIR:-/tmp/ray}"
PREFIX="${OPSD_MONITORING_DIR:-$HOME/.opsd-monitoring}"
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-2.53.1}"
GRAFANA_VERSION="${GRAFANA_VERSION:-11.4.0}"
PROMETHEUS_PORT="${PROMETHEUS_PORT:-9090}"
GRAFANA_PORT="${GRAFANA_PORT:-3000}"
PYTHON="${PYTHON:-python3}"
case "$(uname -m)" in
  x86_64) ARCH=amd64 ;;
  aarch64 | arm64) ARCH=arm64 ;;
  *) echo "opsd-monitoring: unsupported machine $(uname -m)" >&2; exit 1 ;;
esac

log() { echo "opsd-monitoring: $*"; }

# download URL DEST_DIR: a release tarball, unpacked into DEST_DIR without its top directory.
download() {
  local url="$1" dest="$2" tarball
  tarball="$(mktemp "$PREFIX/download.XXXXXX")" || return 1
  log "downloading $url"
  "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$url" "$tarball" \
    && mkdir -p "$dest" && tar -xzf "$tarball" -C "$dest" --strip-components=1
  local status=$?
  rm -f "$tarball"
  [ $status -eq 0 ] || rm -rf "$dest"
  return $status
}

# stop NAME: the process an earlier run of this script started (its pid file), if it still runs.
stop() {
  local pidfile="$PREFIX/$1.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill "$(cat "$pidfile")" && log "stopped the previous $1 ($(cat "$pidfile"))"
    sleep 2
  fi
  rm -f "$pidfile"
}

# wait_for PATH: Ray's head writes the service-discovery file and its Grafana provisioning shortly after it starts.
wait_for() {
  local i
  for i in $(seq 1 60); do
    [ -e "$1" ] && return 0
    sleep 2
  done
  log "$1 did not appear: is the Ray head running (ray start --head), with temp dir $RAY_TMP?"
  return 1
}

mkdir -p "$PREFIX/data/prometheus" "$PREFIX/data/grafana" "$PREFIX/logs"

# Prometheus ---------------------------------------------------------------------------------------------------
stop prometheus
if [ -z "${PROMETHEUS_BIN:-}" ]; then
  PROMETHEUS_BIN="$PREFIX/prometheus-$PROMETHEUS_VERSION/prometheus"
  [ -x "$PROMETHEUS_BIN" ] || download \
    "https://github.com/prometheus/prometheus/releases/download/v$PROMETHEUS_VERSION/prometheus-$PROMETHEUS_VERSION.linux-$ARCH.tar.gz" \
    "$PREFIX/prometheus-$PROMETHEUS_VERSION" || { log "could not install Prometheus"; exit 1; }
fi
wait_for "$RAY_TMP/prom_metrics_service_discovery.json" || exit 1
# The config names Ray's default temp dir; follow `ray start --temp-dir`.
sed "s#/tmp/ray/#$RAY_TMP/#g" "$HERE/prometheus/prometheus.yml" > "$PREFIX/prometheus.yml"
setsid nohup "$PROMETHEUS_BIN" --config.file="$PREFIX/prometheus.yml" --storage.tsdb.path="$PREFIX/data/prometheus" \
  --storage.tsdb.retention.time=30d --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
  < /dev/null > "$PREFIX/logs/prometheus.log" 2>&1 &
echo $! > "$PREFIX/prometheus.pid"
log "Prometheus on 127.0.0.1:$PROMETHEUS_PORT (log: $PREFIX/logs/prometheus.log)"

# Grafana ------------------------------------------------------------------------------------------------------
[ "${SKIP_GRAFANA:-0}" = 1 ] && exit 0
stop grafana
if [ -z "${GRAFANA_HOME:-}" ]; then
  GRAFANA_HOME="$PREFIX/grafana-$GRAFANA_VERSION"
  [ -x "$GRAFANA_HOME/bin/grafana" ] || download \
    "https://dl.grafana.com/oss/release/grafana-$GRAFANA_VERSION.linux-$ARCH.tar.gz" "$GRAFANA_HOME" \
    || { log "could not install Grafana"; exit 1; }
fi
RAY_GRAFANA="$RAY_TMP/session_latest/metrics/grafana"
wait_for "$RAY_GRAFANA/grafana.ini" || exit 1
# Ray's dashboard provider loads every dashboard in this folder (it is rewritten at each `ray start`).
cp "$HERE/grafana/opsd-dashboard.json" "$RAY_GRAFANA/dashboards/opsd-dashboard.json"
GF_PATHS_DATA="$PREFIX/data/grafana" GF_PATHS_LOGS="$PREFIX/logs" \
  GF_SERVER_HTTP_ADDR=127.0.0.1 GF_SERVER_HTTP_PORT="$GRAFANA_PORT" \
  setsid nohup "$GRAFANA_HOME/bin/grafana" server --homepath "$GRAFANA_HOME" --config "$RAY_GRAFANA/grafana.ini" \
  < /dev/null > "$PREFIX/logs/grafana.log" 2>&1 &
echo $! > "$PREFIX/grafana.pid"
log "Grafana on 127.0.0.1:$GRAFANA_PORT, dashboard \"opsd training\" (log: $PREFIX/logs/grafana.log)"
