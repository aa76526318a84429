#!/usr/bin/env bash
# Check per-test verdicts against the expectation file and print the summary.
#
# Usage: check.sh RESULTS EXPECTED
#   RESULTS   "Suite.Test verdict" lines from parse.awk
#   EXPECTED  "Suite.Test verdict" lines ('#' comments and blank lines ignored): the tests known
#             not to pass yet
# Fails when a test fails, or skips in a required family, without being listed (a regression),
# or when a listed test's verdict is not the listed one (the list is stale and must shrink).
# Skips outside the required families are reported and allowed. The last line is the summary:
# "N passed, N failed, N skipped", counting real verdicts.
set -euo pipefail

results=$1
expected=$2

# The families in which no test may be skipped (suite names of iscsi-test-cu).
required="CompareAndWrite WriteSame10 WriteSame16 Unmap GetLBAStatus ReadCapacity16 Inquiry
ModeSense6 ReportSupportedOpcodes Read6 Read10 Read12 Read16 Write10 Write12 Write16 Verify10
Verify12 Verify16 WriteVerify10 WriteVerify12 WriteVerify16 iSCSIcmdsn iSCSIdatasn
iSCSIResiduals iSCSITMF
PrinReadKeys PrinServiceactionRange PrinReportCapabilities ProutRegister ProutReserve ProutClear
ProutPreempt Reserve6"

awk -v required="$required" '
    BEGIN {
        split(required, r, /[ \n]+/)
        for (i in r) if (r[i] != "") req[r[i]] = 1
        bad = 0
    }
    FILENAME == ARGV[1] {
        if ($0 ~ /^[ \t]*(#|$)/) next
        if (NF != 2 || $2 !~ /^(fail|skip)$/) {
            print "BAD LINE in expectation file: " $0
            bad = 1
            next
        }
        listed[$1] = $2
        next
    }
    {
        name = $1; v = $2; seen[name] = 1
        count[v]++
        split(name, p, ".")
        if (name in listed) {
            if (listed[name] != v) {
                print "STALE: " name " is listed as " listed[name] " but now is " v \
                      " (update the expectation file)"
                bad = 1
            }
        } else if (v == "fail") {
            print "REGRESSION: " name " failed"
            bad = 1
        } else if (v == "skip" && (p[1] in req)) {
            print "REGRESSION: " name " skipped in a required family"
            bad = 1
        } else if (v == "skip") {
            print "skipped (allowed outside the required families): " name
        }
    }
    END {
        for (name in listed) if (!(name in seen)) {
            print "STALE: " name " is listed but was not in the run"
            bad = 1
        }
        print (bad ? "conformance: FAILED" : "conformance: ok")
        printf "%d passed, %d failed, %d skipped\n", count["pass"], count["fail"], count["skip"]
        exit bad
    }
' "$expected" "$results"
