#!/bin/bash
# bench/start-time.sh KPROXY MANIFESTS [RUNS]
#
# Start -> /healthz 200 of `kproxy run --proxy-mode ebpf` over MANIFESTS (a
# directory, e.g. from `kproxy-bench manifests DIR --services 10000`), then a
# restart over the pinned maps, RUNS times; RSS one second after each. Runs
# in a network namespace of its own (a veth pair inside it), a cgroup and a
# bpffs of its own; all removed on exit. Logs: /tmp/kpst-{start,restart}.log
# (each program's verification time at debug level; KP_LOG overrides
# RUST_LOG). Needs root.
set -u
KP=$1; M=$2; RUNS=${3:-2}
NS=kpst$$; CGM=/tmp/kpst-cg$$; CG=$CGM/kpst$$; BPF=/tmp/kpst-bpf$$
cleanup() {
  [ -n "${PID:-}" ] && kill $PID 2>/dev/null && wait $PID 2>/dev/null
  umount $BPF 2>/dev/null; rmdir $BPF 2>/dev/null
  rmdir $CG 2>/dev/null; umount $CGM 2>/dev/null; rmdir $CGM 2>/dev/null; ip netns del $NS 2>/dev/null
}
trap cleanup EXIT
ip netns add $NS
ip -n $NS link add kpa type veth peer name kpb
ip -n $NS addr add 10.77.0.1/24 dev kpa; ip -n $NS link set kpa up; ip -n $NS link set kpb up; ip -n $NS link set lo up
mkdir -p $CGM $BPF; mount -t cgroup2 none $CGM; mkdir $CG; mount -t bpf bpf $BPF
for i in $(seq 1 $RUNS); do
  for kind in start restart; do
    [ $kind = start ] && { umount $BPF; mount -t bpf bpf $BPF; }
    t0=$(date +%s.%N)
    ip netns exec $NS env RUST_LOG=${KP_LOG:-info,kproxy::dataplane::ebpf::loader=debug} $KP run --proxy-mode ebpf --bpf-pin-path $BPF/kproxy --cgroup-root $CG --devices kpa \
      --manifests $M --hostname-override node1 --cluster-cidr 10.244.0.0/16 \
      --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 > /tmp/kpst-$kind.log 2>&1 &
    PID=$!
    until ip netns exec $NS curl -sf -o /dev/null http://127.0.0.1:10256/healthz; do kill -0 $PID 2>/dev/null || { echo died; tail -3 /tmp/kpst-$kind.log; exit 1; }; sleep 0.01; done
    t1=$(date +%s.%N)
    sleep 1
    rss=$(awk '/VmRSS/{print $2}' /proc/$PID/status)
    echo "$kind: $(echo "$t1 - $t0" | bc) s, RSS $((rss/1024)) MiB"
    kill $PID; wait $PID; PID=
  done
done
