# The test-list file for `iscsi-test-cu -t FILE`: what the conformance run's main invocation
# asks it to run.
#
# Usage: awk [-v only=SUITE] [-v isolated="Suite.Test ..."] -f select.awk LIST
#   LIST      the output of `iscsi-test-cu -l` (lines ALL.Suite name the suites of `-t ALL`,
#             lines ALL.Suite.Test their tests)
#   isolated  the tests left out here, for scripts/conformance.sh to run each in an invocation
#             of its own
# Prints one line per suite of `-t ALL` (or only SUITE), in LIST's order: "ALL.Suite", which
# runs the whole suite as `-t ALL` would. iscsi-test-cu registers every line of the file as a
# suite of its own, with its own set-up (a fresh login) and clean-up. A suite holding an
# isolated test is split instead: each of its other tests gets a line of its own,
# "ALL.Suite.Test", so it runs on a session of its own.
#
# Why: in libiscsi 1.19 both iSCSITMF tests (test_async_abort_simple.c,
# test_async_lu_reset_simple.c) end by logging out and setting `sd->iscsi_ctx = NULL`, and a
# test that then finds no session reports CU_PASS("[SKIPPED] Non-iSCSI"), which prints
# nothing: under `-t ALL`, LUNResetSimpleAsync never runs and is counted as passed. It cannot
# simply run later in the same process either: once its TMF has been sent, its clean-up frees
# the WRITE task before `iscsi_logout_sync` runs the TMF's callback, which reads it (a
# use-after-free fixed in libiscsi 1.20, commit 2b9c928), and the heap damage can abort
# iscsi-test-cu in a later suite.

BEGIN {
    n = split(isolated, t, /[ \n]+/)
    for (i = 1; i <= n; i++) {
        if (t[i] == "") continue
        iso[t[i]] = 1
        split(t[i], q, ".")
        split_suite[q[1]] = 1
    }
}

{
    k = split($0, p, ".")
    if (p[1] != "ALL" || (only != "" && p[2] != only)) next
    if (k == 2 && !(p[2] in split_suite)) print $0
    if (k == 3 && (p[2] in split_suite) && !((p[2] "." p[3]) in iso)) print $0
}
