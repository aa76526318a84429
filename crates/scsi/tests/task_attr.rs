#![allow(clippy::unwrap_used)]

//! Task attributes (SAM-5 8.6) in the task set all I_T nexuses share (TST 000b): an ORDERED
//! command starts once every older command has completed, the commands after it wait for it,
//! and a HEAD OF QUEUE command starts at once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use scsi::{Completion, ItNexus, Target, TaskAttr, Tmf, TmfResponse};

const BS: usize = 512;

/// A command's future.
type Running = std::pin::Pin<Box<dyn std::future::Future<Output = Completion> + Send>>;

/// Poll a command with attribute `attr` once, as a transport does on receipt (the command
/// arrives now, in order): its future, and what it answered if it completed at once.
fn poll_once(
    t: &Arc<Target>,
    n: &Arc<ItNexus>,
    tag: u64,
    attr: TaskAttr,
    cdb: Vec<u8>,
    data_out: Vec<u8>,
) -> (Running, Option<Completion>) {
    let mut c = cmd(n, tag, &cdb, data_out, 1 << 16);
    c.attr = attr;
    let t = t.clone();
    let mut h: Running = Box::pin(async move { t.execute(c).await });
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let now = match std::future::Future::poll(h.as_mut(), &mut cx) {
        std::task::Poll::Ready(c) => Some(c),
        std::task::Poll::Pending => None,
    };
    (h, now)
}

/// Start a command with attribute `attr`; it arrives at the LU before this returns.
fn start(
    t: &Arc<Target>,
    n: &Arc<ItNexus>,
    tag: u64,
    attr: TaskAttr,
    cdb: Vec<u8>,
    data_out: Vec<u8>,
) -> tokio::task::JoinHandle<Completion> {
    let (h, now) = poll_once(t, n, tag, attr, cdb, data_out);
    assert!(now.is_none(), "the command completed at once: {now:?}");
    tokio::spawn(h)
}

async fn done(h: tokio::task::JoinHandle<Completion>) -> scsi::Response {
    match tokio::time::timeout(Duration::from_secs(10), h).await {
        Ok(Ok(Completion::Done(r))) => r,
        other => panic!("the command did not complete: {other:?}"),
    }
}

/// Not completed by the time every other task has had its turn (a command that could run
/// would have: the memory driver's reads never wait).
async fn waits(h: &tokio::task::JoinHandle<Completion>) -> bool {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    !h.is_finished()
}

#[tokio::test]
async fn an_ordered_read_waits_for_an_older_write_of_another_nexus_and_sees_its_data() {
    let (t, d, a, b) = gated().await;
    let w = start(&t, &a, 1, TaskAttr::Simple, write16(0, 1), vec![0x5A; BS]);
    d.entered.notified().await;
    let ord = start(&t, &b, 2, TaskAttr::Ordered, read16(0, 1), Vec::new());
    let later = start(&t, &a, 3, TaskAttr::Simple, read16(0, 1), Vec::new());
    assert!(waits(&ord).await, "ORDERED ran beside an older command");
    assert!(waits(&later).await, "SIMPLE ran before an older ORDERED");
    d.gate.add_permits(1);
    assert_good(&done(w).await);
    let r = done(ord).await;
    assert_good(&r);
    assert_eq!(
        r.data_in,
        vec![0x5A; BS],
        "the ORDERED read ran after the write"
    );
    assert_good(&done(later).await);
}

#[tokio::test]
async fn a_simple_read_after_an_ordered_write_waits_for_it_and_sees_its_data() {
    let (t, d, a, b) = gated().await;
    let w = start(&t, &a, 1, TaskAttr::Simple, write16(0, 1), vec![0x11; BS]);
    d.entered.notified().await;
    let ord = start(&t, &b, 2, TaskAttr::Ordered, write16(1, 1), vec![0x22; BS]);
    let later = start(&t, &a, 3, TaskAttr::Simple, read16(1, 1), Vec::new());
    assert!(waits(&later).await, "SIMPLE ran before an older ORDERED");
    d.gate.add_permits(2);
    assert_good(&done(w).await);
    assert_good(&done(ord).await);
    let r = done(later).await;
    assert_eq!(
        r.data_in,
        vec![0x22; BS],
        "the SIMPLE read ran after the ORDERED write"
    );
    let order: Vec<u64> = d.writes.lock().unwrap().iter().map(|w| w.0).collect();
    assert_eq!(order, vec![0, 512], "the writes landed in arrival order");
}

#[tokio::test]
async fn head_of_queue_starts_at_once_and_the_simple_ones_after_it_wait_for_it() {
    let (t, d, a, b) = gated().await;
    let w = start(&t, &a, 1, TaskAttr::Simple, write16(0, 1), vec![0x11; BS]);
    d.entered.notified().await;
    let ord = start(&t, &a, 2, TaskAttr::Ordered, read16(0, 1), Vec::new());
    // HEAD OF QUEUE passes both the running write and the waiting ORDERED read.
    let head = start(
        &t,
        &b,
        3,
        TaskAttr::HeadOfQueue,
        write16(5, 1),
        vec![0x55; BS],
    );
    d.entered.notified().await;
    let after = start(&t, &b, 4, TaskAttr::Simple, read16(5, 1), Vec::new());
    assert!(
        waits(&after).await,
        "SIMPLE ran beside a HEAD OF QUEUE command"
    );
    d.gate.add_permits(2);
    assert_good(&done(w).await);
    assert_good(&done(head).await);
    let r = done(after).await;
    assert_eq!(
        r.data_in,
        vec![0x55; BS],
        "it ran after the HEAD OF QUEUE write"
    );
    assert_good(&done(ord).await);
}

#[tokio::test]
async fn abort_task_ends_a_command_waiting_for_its_turn_at_once() {
    let (t, d, a, b) = gated().await;
    let w = start(&t, &a, 1, TaskAttr::Simple, write16(0, 1), vec![0x11; BS]);
    d.entered.notified().await;
    let ord = start(&t, &b, 2, TaskAttr::Ordered, write16(1, 1), vec![0x22; BS]);
    let later = start(&t, &a, 3, TaskAttr::Simple, read16(1, 1), Vec::new());
    // Not started: the abort does not wait for it, and it ends without waiting for the write.
    let resp = t
        .task_management(&b, Tmf::AbortTask { lun: 0, tag: 2 })
        .await;
    assert_eq!(resp, TmfResponse::FunctionComplete);
    match tokio::time::timeout(Duration::from_secs(10), ord).await {
        Ok(Ok(Completion::Aborted)) => {}
        other => panic!("the aborted ORDERED command: {other:?}"),
    }
    assert!(!d.writes.lock().unwrap().iter().any(|w| w.0 == 512));
    // With the ORDERED command gone, the SIMPLE read after it runs beside the write.
    let r = done(later).await;
    assert_eq!(r.data_in, vec![0; BS], "the aborted write never landed");
    d.gate.add_permits(1);
    assert_good(&done(w).await);
}

/// A command its transport still holds (an iSCSI write whose data has not all come) that task
/// management ends leaves the arrival order at once: the commands after it do not wait for
/// data its initiator may never send, and when it does execute it ends as aborted.
#[tokio::test]
async fn a_held_command_task_management_ended_holds_no_one_back() {
    let (t, _d, a, b) = gated().await;
    for tmf in [
        Tmf::LogicalUnitReset { lun: 0 },
        Tmf::ClearTaskSet { lun: 0 },
        Tmf::AbortTaskSet { lun: 0 },
    ] {
        // The ABORT TASK SET comes from the holder's own nexus; the others from b.
        let by = if matches!(tmf, Tmf::AbortTaskSet { .. }) {
            &a
        } else {
            &b
        };
        let ticket = t.admit(&a, 0);
        let held = t.arrive(&a, 0, ticket.as_ref(), TaskAttr::Ordered).unwrap();
        assert_eq!(
            t.task_management(by, tmf).await,
            TmfResponse::FunctionComplete
        );
        // Clearing the unit attentions the function left: commands after the ended one.
        tokio::time::timeout(Duration::from_secs(10), async {
            ready(&t, &a).await;
            ready(&t, &b).await;
        })
        .await
        .unwrap_or_else(|_| panic!("the command {tmf:?} ended still holds the others back"));
        let later = tokio::spawn({
            let t = t.clone();
            let b = b.clone();
            async move {
                t.execute(cmd(&b, 7, &read16(0, 1), Vec::new(), 1 << 16))
                    .await
            }
        });
        assert_good(&done(later).await);
        let mut c = cmd(&a, 8, &write16(0, 1), vec![0x77; BS], 0);
        c.attr = TaskAttr::Ordered;
        c.arrival = Some(held);
        match tokio::time::timeout(Duration::from_secs(10), t.execute_admitted(c, ticket)).await {
            Ok(Completion::Aborted) => {}
            other => panic!("the ended command after {tmf:?}: {other:?}"),
        }
    }
}

/// SAM-5 5.6 (TAS=0): CLEAR TASK SET from another nexus tells a nexus whose only command was
/// still held by its transport (collecting data) that its commands were cleared: UNIT
/// ATTENTION, COMMANDS CLEARED BY ANOTHER INITIATOR (ASC 2Fh, ASCQ 00h). Without it, its
/// initiator would wait for that command in vain.
#[tokio::test]
async fn clear_task_set_tells_a_nexus_whose_only_command_was_held() {
    let (t, _d, a, b) = gated().await;
    let ticket = t.admit(&a, 0);
    let _held = t.arrive(&a, 0, ticket.as_ref(), TaskAttr::Simple).unwrap();
    assert_eq!(
        t.task_management(&b, Tmf::ClearTaskSet { lun: 0 }).await,
        TmfResponse::FunctionComplete
    );
    // TEST UNIT READY (opcode 00h).
    let r = run(&t, &a, &[0x00, 0, 0, 0, 0, 0], Vec::new()).await;
    assert_sense(&r, 0x06, 0x2F, 0x00);
    // The issuer is not told (its own function).
    assert_good(&run(&t, &b, &[0x00, 0, 0, 0, 0, 0], Vec::new()).await);
}

/// A command its transport holds without a ticket is one task management cannot end before it
/// executes, so it cannot take it out of the order either: the commands after it keep waiting
/// for it.
#[tokio::test]
async fn a_held_command_without_a_ticket_keeps_its_place() {
    let (t, _d, a, b) = gated().await;
    let held = t.arrive(&a, 0, None, TaskAttr::Ordered).unwrap();
    assert_eq!(
        t.task_management(&b, Tmf::ClearTaskSet { lun: 0 }).await,
        TmfResponse::FunctionComplete
    );
    let later = start(&t, &b, 7, TaskAttr::Simple, read16(0, 1), Vec::new());
    assert!(
        waits(&later).await,
        "it no longer waits for the ORDERED one"
    );
    drop(held);
    assert_good(&done(later).await);
}

/// The LU has no ACA (standard INQUIRY byte 3 bit 5, NormACA, is zero), so it never holds an
/// ACA condition for a command with the ACA task attribute to run in. Such a command is
/// refused without running: CHECK CONDITION, ILLEGAL REQUEST, INVALID MESSAGE ERROR (49h/00h),
/// and a WRITE so refused writes nothing.
#[tokio::test]
async fn a_command_with_the_aca_attribute_is_refused_and_writes_nothing() {
    let (t, _d, a, _b) = gated().await;
    let mut c = cmd(&a, 1, &write16(3, 1), vec![0xEE; BS], 0);
    c.attr = TaskAttr::Aca;
    match tokio::time::timeout(Duration::from_secs(10), t.execute(c)).await {
        Ok(Completion::Done(r)) => assert_sense(&r, 0x05, 0x49, 0x00),
        other => panic!("an ACA command: {other:?}"),
    }
    assert_eq!(read_blocks(&t, &a, 3, 1).await, vec![0; BS]);
    // Standard INQUIRY: NormACA (byte 3 bit 5) is zero.
    let r = run(&t, &a, &[0x12, 0, 0, 0, 36, 0], Vec::new()).await;
    assert_eq!(r.data_in[3] & 0x20, 0);
}

#[tokio::test]
async fn the_tag_of_a_waiting_command_that_was_aborted_is_free_once_the_abort_is_answered() {
    let (t, d, a, _) = gated().await;
    let w = start(&t, &a, 1, TaskAttr::Simple, write16(0, 1), vec![0x11; BS]);
    d.entered.notified().await;
    // Waits for the write: aborted before it started.
    let ord = start(&t, &a, 2, TaskAttr::Ordered, read16(0, 1), Vec::new());
    let r = t
        .task_management(&a, Tmf::AbortTask { lun: 0, tag: 2 })
        .await;
    assert_eq!(r, TmfResponse::FunctionComplete);
    // The initiator has the answer and uses tag 2 again before the aborted command's own
    // future has run again: not an overlapped command (ABORTED COMMAND, 4Eh/00h).
    let (again, now) = poll_once(&t, &a, 2, TaskAttr::Simple, read16(0, 1), Vec::new());
    assert_eq!(now, None, "tag 2 was refused at once");
    d.gate.add_permits(1);
    assert_good(&done(w).await);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), ord)
            .await
            .unwrap()
            .unwrap(),
        Completion::Aborted
    );
    match tokio::time::timeout(Duration::from_secs(10), again).await {
        Ok(Completion::Done(r)) => assert_eq!(r.data_in, vec![0x11; BS]),
        other => panic!("the new command with tag 2 did not complete: {other:?}"),
    }
}
