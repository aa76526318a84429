# Helpers for guest test scripts (busybox sh), sourced as /lib.sh. See init for the results
# channel (fd 3); besides the lines init lists, `finish` writes "FINISH N" on it. Every check
# prints one RESULT line; a script ends with `finish`, which reports FINISH N and exits with N,
# the number of failed checks (capped): the host requires DONE N to follow, so a script that
# ends any other way (an early exit, a crash) fails its case.

failures=0

# pass NAME [DETAIL] / fail NAME [DETAIL]
pass() { name=$1; shift; echo "RESULT $name PASS $*" >&3; echo "[guest] PASS $name $*"; }
fail() {
    name=$1; shift
    echo "RESULT $name FAIL $*" >&3
    echo "[guest] FAIL $name $*"
    failures=$((failures + 1))
}

# value NAME VALUE: a value the host compares with other guests' (or its own knowledge).
value() { echo "VALUE $1 $2" >&3; echo "[guest] VALUE $1 $2"; }

# expect_rc NAME WANT CMD...: runs CMD (output to the console), checks its exit status.
expect_rc() {
    name=$1 want=$2
    shift 2
    echo "[guest] \$ $*"
    "$@"
    rc=$?
    if [ "$rc" -eq "$want" ]; then pass "$name" "exit $rc"; else fail "$name" "exit $rc, want $want: $*"; fi
    return 0
}

# check NAME CMD...: passes when CMD exits 0.
check() { n=$1; shift; expect_rc "$n" 0 "$@"; }

# sync_point NAME: tells the host this guest reached NAME and waits for "GO NAME".
sync_point() {
    echo "SYNC $1" >&3
    echo "[guest] sync $1"
    while read -r word arg <&3; do
        if [ "$word" = GO ] && [ "$arg" = "$1" ]; then return 0; fi
        if [ "$word" = ABORT ]; then echo "[guest] host aborted"; finish; fi
    done
    fail "sync-$1" "results channel closed"
    finish
}

# wait_disks N [SECONDS]: waits until N SCSI disks (sd*) exist; prints them, in name order.
wait_disks() {
    want=$1 secs=${2:-30}
    i=0
    while [ "$i" -lt $((secs * 10)) ]; do
        n=$(ls /sys/block | grep -c '^sd')
        [ "$n" -ge "$want" ] && break
        usleep 100000
        i=$((i + 1))
    done
    ls /sys/block | grep '^sd' | sort
}

# iscsi_attach: reaches the disk through Linux's own iSCSI initiator (iscsi_tcp driven by
# open-iscsi's iscsid) over the guest's network, QEMU's user networking, in which the host's
# loopback is 10.0.2.2. Environment: ISCSI_PORTAL (10.0.2.2:PORT), ISCSI_TARGET (the
# target's name), GUEST_INITIATOR (this guest's name, run.sh's --initiator), ISCSI_DIGEST
# (None or CRC32C: the header and data digests the initiator asks for and must get),
# ISCSI_SESSIONS (1 or 2: sessions to the target, each with an ISID of its own), and "USER
# SECRET" pairs for CHAP: ISCSI_DISCOVERY_CHAP and ISCSI_DISCOVERY_MUTUAL (discovery's,
# the second the target's own for mutual CHAP), ISCSI_CHAP (the target's),
# ISCSI_MUTUAL (the target's own, mutual CHAP); with CHAP, a session without the secret, or
# with a wrong one either way, must be refused first. Brings up eth0, starts iscsid, runs a
# SendTargets discovery (which must list ISCSI_TARGET), logs in and checks what was
# negotiated; the disk then appears as sdX. Without a session, the script ends there.
iscsi_attach() {
    ip link set lo up
    if ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 &&
        ip route add default via 10.0.2.2; then
        pass net-up "eth0 10.0.2.15"
    else
        fail net-up "cannot configure eth0"
        finish
    fi
    mkdir -p /etc/iscsi /var/lib/iscsi /run/lock/iscsi /var/lock
    # iscsid serves only a peer whose uid it can name (getpwuid): root.
    echo "root:x:0:0:root:/root:/bin/sh" >/etc/passwd
    echo "root:x:0:" >/etc/group
    echo "InitiatorName=$GUEST_INITIATOR" >/etc/iscsi/initiatorname.iscsi
    # open-iscsi's defaults, but iscsid is started here, and the kernel pings the target
    # (NOP-Out) after 5 s of silence and drops the connection when no NOP-In answers within
    # 5 s: a guest idle for ISCSI_IDLE seconds exercises the keep-alive (iscsi_detach).
    cat >/etc/iscsi/iscsid.conf <<EOF
iscsid.startup = /bin/true
node.startup = manual
node.session.timeo.replacement_timeout = 30
node.conn[0].timeo.login_timeout = 15
node.conn[0].timeo.logout_timeout = 15
node.conn[0].timeo.noop_out_interval = 5
node.conn[0].timeo.noop_out_timeout = 5
node.session.err_timeo.abort_timeout = 15
node.session.err_timeo.lu_reset_timeout = 30
node.session.err_timeo.tgt_reset_timeout = 30
node.session.initial_login_retry_max = 2
node.session.iscsi.InitialR2T = No
node.session.iscsi.ImmediateData = Yes
node.session.iscsi.FirstBurstLength = 262144
node.session.iscsi.MaxBurstLength = 16776192
node.conn[0].iscsi.MaxRecvDataSegmentLength = 262144
node.conn[0].iscsi.HeaderDigest = ${ISCSI_DIGEST:-None}
node.conn[0].iscsi.DataDigest = ${ISCSI_DIGEST:-None}
discovery.sendtargets.iscsi.MaxRecvDataSegmentLength = 32768
EOF
    if iscsid; then pass iscsid-starts; else fail iscsid-starts "iscsid exited $?"; finish; fi
    # wrong "USER SECRET": the same user with another secret.
    wrong() { echo "${1% *} wrong-${1#* }"; }
    login() { iscsiadm -m node -T "$ISCSI_TARGET" -p "$ISCSI_PORTAL" --login; }
    if [ -n "${ISCSI_DISCOVERY_CHAP:-}" ]; then
        # A discovery session without CHAP is refused (24: authentication failed). That
        # first try also makes the discoverydb record the settings below go into.
        expect_rc discovery-without-chap 24 iscsiadm -m discovery -t sendtargets -p "$ISCSI_PORTAL"
        if [ -n "${ISCSI_DISCOVERY_MUTUAL:-}" ]; then
            # A portal that cannot prove itself is refused by the initiator.
            iscsi_auth discoverydb -t sendtargets -p "$ISCSI_PORTAL" -- \
                discovery.sendtargets.auth "$ISCSI_DISCOVERY_CHAP" "$(wrong "$ISCSI_DISCOVERY_MUTUAL")"
            expect_rc discovery-target-unproven 19 \
                iscsiadm -m discoverydb -t sendtargets -p "$ISCSI_PORTAL" --discover
        fi
        iscsi_auth discoverydb -t sendtargets -p "$ISCSI_PORTAL" -- \
            discovery.sendtargets.auth "$ISCSI_DISCOVERY_CHAP" "${ISCSI_DISCOVERY_MUTUAL:-}"
        echo "[guest] \$ iscsiadm -m discoverydb -t sendtargets -p $ISCSI_PORTAL --discover"
        found=$(iscsiadm -m discoverydb -t sendtargets -p "$ISCSI_PORTAL" --discover 2>&1)
    else
        echo "[guest] \$ iscsiadm -m discovery -t sendtargets -p $ISCSI_PORTAL"
        found=$(iscsiadm -m discovery -t sendtargets -p "$ISCSI_PORTAL" 2>&1)
    fi
    echo "$found"
    # "PORTAL,TPGT TARGET" per line.
    if echo "$found" | grep -q " $ISCSI_TARGET\$"; then
        pass discovery "SendTargets lists $ISCSI_TARGET"
    else
        fail discovery "SendTargets does not list $ISCSI_TARGET"
    fi
    # The portal the target names is the host's loopback, not reachable from here: the
    # session goes to the address the guest reaches the host at.
    if [ "${ISCSI_SESSIONS:-1}" -eq 2 ]; then
        # Two sessions to the same portal through two iface records, as multipath setups
        # make: each session gets an ISID of its own.
        # (A node record made without the portal's group tag is one per portal, whatever
        # the iface; the tag is the one discovery reported.)
        tpgt=$(echo "$found" | sed -n "s/^[^ ]*,\([0-9]*\) $ISCSI_TARGET\$/\1/p" | head -n1)
        for iface in path1 path2; do
            iscsiadm -m iface -I "$iface" -o new >/dev/null
            iscsiadm -m node -o new -T "$ISCSI_TARGET" -p "$ISCSI_PORTAL,${tpgt:-1}" \
                -I "$iface" >/dev/null
        done
    else
        iscsiadm -m node -o new -T "$ISCSI_TARGET" -p "$ISCSI_PORTAL" >/dev/null
    fi
    if [ -n "${ISCSI_CHAP:-}" ]; then
        # The target admits only an initiator that proves it knows the secret; with mutual
        # CHAP the initiator admits only a target that proves it knows its own. Each refused
        # login below is wrong in one thing only.
        auth() { iscsi_auth node -T "$ISCSI_TARGET" -p "$ISCSI_PORTAL" -- node.session.auth "$@"; }
        expect_rc login-without-chap 24 login
        if [ -n "${ISCSI_MUTUAL:-}" ]; then
            # A target set up for mutual CHAP refuses an initiator that does not ask for it.
            auth "$ISCSI_CHAP"
            expect_rc login-without-mutual 24 login
            auth "$(wrong "$ISCSI_CHAP")" "$ISCSI_MUTUAL"
            expect_rc login-wrong-secret 24 login
            # The initiator ends the login itself (19: fatal login error).
            auth "$ISCSI_CHAP" "$(wrong "$ISCSI_MUTUAL")"
            expect_rc login-target-unproven 19 login
            auth "$ISCSI_CHAP" "$ISCSI_MUTUAL"
        else
            auth "$(wrong "$ISCSI_CHAP")"
            expect_rc login-wrong-secret 24 login
            auth "$ISCSI_CHAP"
        fi
    fi
    # Connection errors count from here on (the refused logins above end in some): from a
    # mark in the kernel's log, which a ring buffer that wraps cannot move.
    echo "sharedisk-test: logging in" >/dev/kmsg
    expect_rc iscsi-login 0 login
    iscsiadm -m session -P 2 >/tmp/session 2>&1
    cat /tmp/session
    n=$(iscsiadm -m session 2>/dev/null | grep -c "$ISCSI_TARGET")
    if [ "$n" -eq "${ISCSI_SESSIONS:-1}" ]; then
        pass iscsi-sessions "$n"
    else
        fail iscsi-sessions "$n sessions, want ${ISCSI_SESSIONS:-1}"
    fi
    for key in HeaderDigest DataDigest; do
        got=$(sed -n "s/^[[:space:]]*$key: *//p" /tmp/session | head -n1)
        if [ "$got" = "${ISCSI_DIGEST:-None}" ]; then
            pass "negotiated-$key" "$got"
        else
            fail "negotiated-$key" "'$got', want ${ISCSI_DIGEST:-None}"
        fi
    done
    iscsi_attached=1
}

# iscsi_auth MODE RECORD-OPTIONS... -- PREFIX "USER SECRET" ["USER_IN SECRET_IN"]: CHAP in an
# iscsiadm record (node or discoverydb): PREFIX.authmethod, username and password, and the
# target's own (mutual CHAP) username_in and password_in when given.
iscsi_auth() {
    mode=$1
    shift
    rec=""
    while [ "$1" != -- ]; do rec="$rec $1"; shift; done
    prefix=$2 out=$3 back=${4:-}
    set -- authmethod CHAP username "${out% *}" password "${out#* }"
    [ -z "$back" ] || set -- "$@" username_in "${back% *}" password_in "${back#* }"
    while [ $# -gt 0 ]; do
        # shellcheck disable=SC2086
        iscsiadm -m "$mode" $rec -o update -n "$prefix.$1" -v "$2" ||
            fail iscsi-auth-setting "cannot set $prefix.$1"
        shift 2
    done
}

# iscsi_detach: after ISCSI_IDLE seconds (default 0) with no I/O, in which the kernel pings
# the target (NOP-Out, every 5 s), checks that the connection never failed (a ping the target
# did not answer, a PDU the kernel took for a protocol error; unless the script set
# iscsi_recovered, having broken it on purpose), then logs the session out (Logout request;
# the disk goes away).
iscsi_detach() {
    iscsi_attached=
    [ "${ISCSI_IDLE:-0}" -eq 0 ] || { echo "[guest] idle for ${ISCSI_IDLE}s"; sleep "$ISCSI_IDLE"; }
    dmesg >/tmp/dmesg
    sed -n '/sharedisk-test: logging in/,$p' /tmp/dmesg |
        grep -i 'conn error\|ping timeout\|session recovery' >/tmp/connerr
    if [ -n "${iscsi_recovered:-}" ]; then
        # A script that broke the connection on purpose (restart.sh) checked its recovery.
        :
    elif ! grep -q 'sharedisk-test: logging in' /tmp/dmesg; then
        fail iscsi-connection-kept "the mark iscsi_attach left in the kernel's log is gone"
    elif [ -s /tmp/connerr ]; then
        fail iscsi-connection-kept "$(head -n 3 /tmp/connerr | tr '\n' ' ')"
    else
        pass iscsi-connection-kept "no connection error, ping timeout or session recovery"
    fi
    expect_rc iscsi-logout 0 iscsiadm -m node -T "$ISCSI_TARGET" -p "$ISCSI_PORTAL" --logout
    i=0
    while ls /sys/block | grep -q '^sd' && [ "$i" -lt 100 ]; do usleep 100000; i=$((i + 1)); done
    if ls /sys/block | grep -q '^sd'; then
        fail disk-leaves "the disk is still there 10 s after the logout"
    else
        pass disk-leaves
    fi
}

# first_disk: waits up to 30 s for the first SCSI disk and sets disk (sdX) and dev (/dev/sdX),
# with the check disk-appears; without one, the script ends there. With ISCSI_PORTAL set, the
# disk is first reached through Linux's iSCSI initiator (iscsi_attach).
first_disk() {
    [ -z "${ISCSI_PORTAL:-}" ] || iscsi_attach
    disk=$(wait_disks 1 30 | head -n1)
    [ -n "$disk" ] || { fail disk-appears "no /dev/sd* after 30 s"; finish; }
    dev=/dev/$disk
    pass disk-appears "$dev"
}

# clear_ua DEV: TEST UNIT READY until one passes, at most four times. A unit attention
# (registrations preempted, reservations released, ...) is reported once per nexus, on
# whatever command comes first: this takes them before a check.
clear_ua() { for _ in 1 2 3 4; do sg_turs "$1" >/dev/null 2>&1 && return 0; done; return 1; }

# pr_keys DEV: what READ KEYS shows, as "generation=G keys=K1,K2" (the keys sorted; "none"
# for none), or "error: ..." with sg_persist's output.
pr_keys() {
    out=$(sg_persist -n --in --read-keys "$1" 2>&1) || { echo "error: $out" | tr '\n' ' '; return; }
    gen=$(echo "$out" | sed -n 's/.*PR generation=\(0x[0-9a-f]*\).*/\1/p')
    ks=$(echo "$out" | grep -E '^ +0x[0-9a-f]+$' | tr -d ' ' | sort | tr '\n' ',' | sed 's/,$//')
    echo "generation=$gen keys=${ks:-none}"
}

# pr_reservation DEV: what READ RESERVATION shows, as "generation=G holder=KEY type=TYPE"
# (TYPE as sg_persist names it, blanks and commas made underscores) or "generation=G none",
# or "error: ..." with sg_persist's output.
pr_reservation() {
    out=$(sg_persist -n --in --read-reservation "$1" 2>&1) || { echo "error: $out" | tr '\n' ' '; return; }
    gen=$(echo "$out" | sed -n 's/.*PR generation=\(0x[0-9a-f]*\).*/\1/p')
    holder=$(echo "$out" | sed -n 's/^ *Key=\(0x[0-9a-f]*\).*/\1/p')
    rtype=$(echo "$out" | sed -n 's/.*type: *\(.*\)$/\1/p' | tr -s ' ' | tr ' ,' '_')
    if [ -n "$holder" ]; then echo "generation=$gen holder=$holder type=$rtype"; else echo "generation=$gen none"; fi
}

# sg_of DISK: the sg node (/dev/sgN) of a disk (sdX).
sg_of() { ls "/sys/block/$1/device/scsi_generic" 2>/dev/null | head -n1 | sed 's,^,/dev/,'; }

# finish: ends the script with the number of failed checks as its status, after reporting it
# (FINISH N) on the results channel; an iSCSI session of iscsi_attach is logged out first.
finish() {
    [ -z "${iscsi_attached:-}" ] || iscsi_detach
    [ "$failures" -gt 100 ] && failures=100
    echo "FINISH $failures" >&3
    exit "$failures"
}
