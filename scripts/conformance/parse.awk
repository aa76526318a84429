# Per-test verdicts of an iscsi-test-cu run.
#
# Usage: awk [-v only=SUITE] -f parse.awk LIST OUTPUT...
#   LIST    the output of `iscsi-test-cu -l` (lines ALL.Suite.Test name the tests of `-t ALL`)
#   OUTPUT  the stdout of `iscsi-test-cu -V` runs that together ran the tests of `-t ALL` (or of
#           `-t ALL.SUITE` with only=SUITE), in CUnit's default (verbose) mode; each file is one
#           run. -V (iscsi-test-cu's verbose log level) matters: some tests (NoMedia.NoMediaSBC,
#           StartStopUnit.NoLoej and .PwrCnd in libiscsi 1.19) log their "[SKIPPED]" only at that
#           level, and would otherwise read as passed.
# Prints "Suite.Test verdict" for every test in LIST, in LIST's order; verdict is pass, fail or
# skip.
#
# How CUnit's verbose mode reports a test: "  Test: NAME ..." then the test's own log lines,
# then the verdict "passed" or "FAILED", either right after the "..." or at the start of a later
# line (failed assertions follow a FAILED, indented). libiscsi reports a skipped test as passed,
# after logging "[SKIPPED]", so a passed test that logged "[SKIPPED]" is a skip. Whatever comes
# after the verdict (e.g. "[FAILED]" from the suite's cleanup) belongs to no test. A listed test
# with no verdict did not run (its suite's set-up failed, or the run died): fail.

FILENAME == ARGV[1] {
    if (split($0, p, ".") == 3 && p[1] == "ALL" && (only == "" || p[2] == only)) {
        order[++n] = p[2] "." p[3]
    }
    next
}

function verdict(text) {
    if (text ~ /^(passed|FAILED)/) {
        if (!(current in result)) {
            result[current] = text ~ /^FAILED/ ? "fail" : (skipped ? "skip" : "pass")
        }
        current = ""
        return
    }
    if (index(text, "[SKIPPED]") > 0) {
        skipped = 1
    }
}

FNR == 1 {
    # A new run: whatever test the previous one left without a verdict got none.
    current = ""
}

/^Suite: / {
    suite = substr($0, 8)
    current = ""
    next
}

/^  Test: .* \.\.\./ {
    rest = substr($0, 9)
    i = index(rest, " ...")
    current = suite "." substr(rest, 1, i - 1)
    skipped = 0
    verdict(substr(rest, i + 4))
    next
}

current != "" {
    verdict($0)
}

END {
    for (i = 1; i <= n; i++) {
        name = order[i]
        if (name in result) {
            print name, result[name]
        } else {
            print name, "fail"
            print "not run: " name > "/dev/stderr"
        }
    }
}
