#![allow(clippy::unwrap_used)]

//! Task management (SAM-5 7): aborts wait for running tasks, so an aborted write never lands
//! after the TMF response; unit attentions that TMFs raise.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use scsi::{Completion, ItNexus, Status, Target, Tmf, TmfResponse};

const BS: usize = 512;

/// Start a WRITE(16) of one block of `fill` at `lba` and wait until it reaches the driver.
async fn start_write(
    t: &Arc<Target>,
    d: &Arc<GatedDriver>,
    n: &Arc<ItNexus>,
    tag: u64,
    lba: u64,
    fill: u8,
) -> tokio::task::JoinHandle<Completion> {
    let t = t.clone();
    let n = n.clone();
    let h = tokio::spawn(async move {
        t.execute(cmd(&n, tag, &write16(lba, 1), vec![fill; BS], 0))
            .await
    });
    d.entered.notified().await;
    h
}

/// Run task management function `tmf` of `n` as a task of its own (it waits for the tasks it
/// ends).
fn spawn_tmf(t: &Arc<Target>, n: &Arc<ItNexus>, tmf: Tmf) -> tokio::task::JoinHandle<TmfResponse> {
    let (t, n) = (t.clone(), n.clone());
    tokio::spawn(async move { t.task_management(&n, tmf).await })
}

async fn is_pending<T>(h: &mut tokio::task::JoinHandle<T>) -> bool {
    tokio::time::timeout(Duration::from_millis(30), h)
        .await
        .is_err()
}

#[tokio::test]
async fn abort_task_waits_for_the_running_write_and_completes_it_as_aborted() {
    let (t, d, a, _) = gated().await;
    let w = start_write(&t, &d, &a, 5, 0, 0x11).await;
    let (t2, a2) = (t.clone(), a.clone());
    let mut tmf = tokio::spawn(async move {
        t2.task_management(&a2, Tmf::AbortTask { lun: 0, tag: 5 })
            .await
    });
    assert!(
        is_pending(&mut tmf).await,
        "TMF answered before the write finished"
    );
    d.gate.add_permits(1);
    assert_eq!(tmf.await.unwrap(), TmfResponse::FunctionComplete);
    assert_eq!(w.await.unwrap(), Completion::Aborted);
    // The write ran to the end before the TMF answered.
    d.gate.add_permits(100);
    assert_eq!(read_blocks(&t, &a, 0, 1).await, vec![0x11; BS]);
}

#[tokio::test]
async fn abort_task_for_unknown_tag_is_task_does_not_exist() {
    let (t, _, a, _) = gated().await;
    let r = t
        .task_management(&a, Tmf::AbortTask { lun: 0, tag: 99 })
        .await;
    assert_eq!(r, TmfResponse::TaskDoesNotExist);
}

#[tokio::test]
async fn tmf_to_missing_lun_is_incorrect_lun() {
    let (t, _, a, _) = gated().await;
    assert_eq!(
        t.task_management(&a, Tmf::AbortTaskSet { lun: 3 }).await,
        TmfResponse::IncorrectLun
    );
    assert_eq!(
        t.task_management(&a, Tmf::LogicalUnitReset { lun: 3 })
            .await,
        TmfResponse::IncorrectLun
    );
}

#[tokio::test]
async fn abort_task_of_another_nexus_does_not_exist() {
    let (t, d, a, b) = gated().await;
    let w = start_write(&t, &d, &a, 5, 0, 1).await;
    let r = t
        .task_management(&b, Tmf::AbortTask { lun: 0, tag: 5 })
        .await;
    assert_eq!(r, TmfResponse::TaskDoesNotExist);
    d.gate.add_permits(1);
    assert!(matches!(w.await.unwrap(), Completion::Done(r) if r.status == Status::GOOD));
}

#[tokio::test]
async fn abort_task_set_aborts_only_this_nexus_tasks() {
    let (t, d, a, b) = gated().await;
    let wa = start_write(&t, &d, &a, 1, 0, 1).await;
    let wb = start_write(&t, &d, &b, 1, 1, 2).await;
    let tmf = spawn_tmf(&t, &a, Tmf::AbortTaskSet { lun: 0 });
    d.gate.add_permits(2);
    assert_eq!(tmf.await.unwrap(), TmfResponse::FunctionComplete);
    assert_eq!(wa.await.unwrap(), Completion::Aborted);
    assert!(matches!(wb.await.unwrap(), Completion::Done(r) if r.status == Status::GOOD));
}

#[tokio::test]
async fn clear_task_set_aborts_all_and_tells_the_other_nexus() {
    let (t, d, a, b) = gated().await;
    let wa = start_write(&t, &d, &a, 1, 0, 1).await;
    let wb = start_write(&t, &d, &b, 1, 1, 2).await;
    let tmf = spawn_tmf(&t, &a, Tmf::ClearTaskSet { lun: 0 });
    d.gate.add_permits(2);
    assert_eq!(tmf.await.unwrap(), TmfResponse::FunctionComplete);
    assert_eq!(wa.await.unwrap(), Completion::Aborted);
    assert_eq!(wb.await.unwrap(), Completion::Aborted);
    let r = run(&t, &b, &[0x00, 0, 0, 0, 0, 0], vec![]).await;
    assert_sense(&r, 0x06, 0x2F, 0x00); // COMMANDS CLEARED BY ANOTHER INITIATOR
    assert_good(&run(&t, &a, &[0x00, 0, 0, 0, 0, 0], vec![]).await);
}

const TUR: [u8; 6] = [0x00, 0, 0, 0, 0, 0]; // TEST UNIT READY

/// Run, with `ticket`, a TEST UNIT READY of `n` that its transport received before task
/// management ended it and held without a place in the order (an iSCSI command waiting for a
/// CmdSN gap): it ends as aborted.
async fn ended_before_it_ran(t: &Target, n: &Arc<ItNexus>, ticket: Option<scsi::Ticket>) {
    let c = cmd(n, 9, &TUR, vec![], 0);
    match tokio::time::timeout(Duration::from_secs(10), t.execute_admitted(c, ticket)).await {
        Ok(Completion::Aborted) => {}
        other => panic!("the command task management ended: {other:?}"),
    }
}

/// SAM-5 5.6 (TAS=0): a nexus whose only command another nexus's CLEAR TASK SET ended had no
/// place in the task set or the order yet (received, held for a CmdSN gap). Its initiator
/// gets no answer for it, so it must be told: COMMANDS CLEARED BY ANOTHER INITIATOR (2Fh/00h),
/// once, when the command comes to execute.
#[tokio::test]
async fn clear_task_set_tells_a_nexus_whose_only_command_was_received_but_not_placed() {
    let (t, _d, a, b) = gated().await;
    let ticket = t.admit(&b, 0);
    assert_eq!(
        t.task_management(&a, Tmf::ClearTaskSet { lun: 0 }).await,
        TmfResponse::FunctionComplete
    );
    ended_before_it_ran(&t, &b, ticket).await;
    assert_sense(&run(&t, &b, &TUR, vec![]).await, 0x06, 0x2F, 0x00);
    assert_good(&run(&t, &b, &TUR, vec![]).await);
    // The issuer is not told: it cleared the task set itself.
    assert_good(&run(&t, &a, &TUR, vec![]).await);
}

/// One clearing is told once: a nexus told because its running write was aborted is not told
/// again when its other command, ended by the same CLEAR TASK SET, comes to execute later.
#[tokio::test]
async fn a_clearing_already_told_is_not_told_again_by_a_command_ended_with_it() {
    let (t, d, a, b) = gated().await;
    let wb = start_write(&t, &d, &b, 1, 0, 1).await;
    let ticket = t.admit(&b, 0);
    let tmf = spawn_tmf(&t, &a, Tmf::ClearTaskSet { lun: 0 });
    d.gate.add_permits(1);
    assert_eq!(tmf.await.unwrap(), TmfResponse::FunctionComplete);
    assert_eq!(wb.await.unwrap(), Completion::Aborted);
    assert_sense(&run(&t, &b, &TUR, vec![]).await, 0x06, 0x2F, 0x00);
    ended_before_it_ran(&t, &b, ticket).await;
    assert_good(&run(&t, &b, &TUR, vec![]).await);
}

/// The same clearing told first by a command of the nexus that it ended before the command
/// had a place (while the function still waits for the nexus's running write), then by the
/// function itself once that write is done: the nexus is told once.
#[tokio::test]
async fn a_clearing_told_by_an_ended_command_is_not_told_again_by_the_function() {
    let (t, d, a, b) = gated().await;
    // Tag 2: `run` below sends its TEST UNIT READYs as tag 1.
    let wb = start_write(&t, &d, &b, 2, 0, 1).await;
    let ticket = t.admit(&b, 0);
    let tmf = spawn_tmf(&t, &a, Tmf::ClearTaskSet { lun: 0 });
    // The function has ended b's received command (and waits for the write in the disk).
    let ended = || ticket.as_ref().is_some_and(|tk| t.ticket_ended(&b, 0, tk));
    let start = std::time::Instant::now();
    while !ended() {
        assert!(start.elapsed() < Duration::from_secs(10), "not ended");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    ended_before_it_ran(&t, &b, ticket).await;
    assert_sense(&run(&t, &b, &TUR, vec![]).await, 0x06, 0x2F, 0x00);
    d.gate.add_permits(1);
    assert_eq!(tmf.await.unwrap(), TmfResponse::FunctionComplete);
    assert_eq!(wb.await.unwrap(), Completion::Aborted);
    assert_good(&run(&t, &b, &TUR, vec![]).await);
}

/// A PERSISTENT RESERVE OUT parameter list (SPC-5 6.17.3): RESERVATION KEY (bytes 0-7),
/// SERVICE ACTION RESERVATION KEY (bytes 8-15), 24 bytes in all.
fn pr_param(key: u8, sa_key: u8) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[7] = key;
    p[15] = sa_key;
    p
}

/// PREEMPT AND ABORT (SPC-5 5.14.11.2.5) ends the preempted nexus's commands like CLEAR TASK
/// SET: one received but not yet placed tells its nexus too.
#[tokio::test]
async fn preempt_and_abort_tells_a_nexus_whose_only_command_was_received_but_not_placed() {
    let (t, _d, a, b) = gated().await;
    // REGISTER (service action 00h): a with key 0xA, b with key 0xB.
    let register = [0x5F, 0x00, 0, 0, 0, 0, 0, 0, 24, 0];
    assert_good(&run(&t, &a, &register, pr_param(0, 0xA)).await);
    assert_good(&run(&t, &b, &register, pr_param(0, 0xB)).await);
    // b's command is received; a preempts b's key and aborts its tasks: PREEMPT AND ABORT
    // (service action 05h), type 1h (Write Exclusive) in byte 2.
    let ticket = t.admit(&b, 0);
    let preempt_and_abort = [0x5F, 0x05, 0x01, 0, 0, 0, 0, 0, 24, 0];
    assert_good(&run(&t, &a, &preempt_and_abort, pr_param(0xA, 0xB)).await);
    ended_before_it_ran(&t, &b, ticket).await;
    // First the preemption's REGISTRATIONS PREEMPTED (2Ah/05h), then the clearing.
    assert_sense(&run(&t, &b, &TUR, vec![]).await, 0x06, 0x2A, 0x05);
    assert_sense(&run(&t, &b, &TUR, vec![]).await, 0x06, 0x2F, 0x00);
    assert_good(&run(&t, &b, &TUR, vec![]).await);
}

/// PREEMPT AND ABORT that names the sender's own key (SPC-5 5.14.11.2.5: the preempted
/// registrations' nexuses lose their tasks, the PERSISTENT RESERVE OUT itself excepted) also
/// ends the sender's command received before it and still held by the transport (collecting
/// its data): it does not run after GOOD. The sender is not told that another initiator
/// cleared it.
#[tokio::test]
async fn preempt_and_abort_of_the_senders_own_key_ends_its_command_received_before_it() {
    let (t, _d, a, _b) = gated().await;
    // REGISTER (00h) with key 0xA, RESERVE (01h) type 1h (Write Exclusive).
    assert_good(
        &run(
            &t,
            &a,
            &[0x5F, 0x00, 0, 0, 0, 0, 0, 0, 24, 0],
            pr_param(0, 0xA),
        )
        .await,
    );
    assert_good(
        &run(
            &t,
            &a,
            &[0x5F, 0x01, 0x01, 0, 0, 0, 0, 0, 24, 0],
            pr_param(0xA, 0),
        )
        .await,
    );
    let ticket = t.admit(&a, 0);
    // PREEMPT AND ABORT (05h), type 1h, of key 0xA by its holder.
    let preempt_and_abort = [0x5F, 0x05, 0x01, 0, 0, 0, 0, 0, 24, 0];
    assert_good(&run(&t, &a, &preempt_and_abort, pr_param(0xA, 0xA)).await);
    ended_before_it_ran(&t, &a, ticket).await;
    // Not COMMANDS CLEARED BY ANOTHER INITIATOR (2Fh/00h): its own command cleared it.
    assert_good(&run(&t, &a, &TUR, vec![]).await);
}

#[tokio::test]
async fn logical_unit_reset_resets_mode_pages_and_raises_ua_on_every_nexus() {
    let (t, d, a, b) = gated().await;
    // Turn on SWP, then reset: SWP must be back to its default (off).
    let p = vec![
        0, 0, 0, 0, 0x0A, 0x0A, 0, 0x10, 0x08, 0, 0, 0, 0xFF, 0xFF, 0, 0,
    ];
    assert_good(&run(&t, &a, &[0x15, 0x10, 0, 0, 16, 0], p).await);
    let r = run(&t, &a, &write16(0, 1), vec![0; BS]).await;
    assert_sense(&r, 0x07, 0x27, 0x00);
    let r = t
        .task_management(&a, Tmf::LogicalUnitReset { lun: 0 })
        .await;
    assert_eq!(r, TmfResponse::FunctionComplete);
    for n in [&a, &b] {
        let r = run(&t, n, &[0x00, 0, 0, 0, 0, 0], vec![]).await;
        assert_sense(&r, 0x06, 0x29, 0x03); // BUS DEVICE RESET FUNCTION OCCURRED
    }
    d.gate.add_permits(1);
    assert_good(&run(&t, &a, &write16(0, 1), vec![0; BS]).await);
}

/// A reset, or the loss of the nexus, reports its own unit attention first, but does not
/// make the initiator miss a condition it had not been told yet: here MODE PARAMETERS
/// CHANGED (2Ah/01h), which another nexus's MODE SELECT raised, comes next (LIO and SCST
/// keep such conditions too).
#[tokio::test]
async fn a_reset_or_nexus_loss_reports_first_and_keeps_the_conditions_not_yet_told() {
    let (t, _d, a, b) = gated().await;
    // MODE SELECT(6), PF, by a: the control page (0Ah, length 0Ah) with SWP (byte 4 bit 3)
    // set, as in the test above.
    let p = vec![
        0, 0, 0, 0, 0x0A, 0x0A, 0, 0x10, 0x08, 0, 0, 0, 0xFF, 0xFF, 0, 0,
    ];
    assert_good(&run(&t, &a, &[0x15, 0x10, 0, 0, 16, 0], p.clone()).await);
    let r = t
        .task_management(&a, Tmf::LogicalUnitReset { lun: 0 })
        .await;
    assert_eq!(r, TmfResponse::FunctionComplete);
    assert_sense(&run(&t, &b, &TUR, vec![]).await, 0x06, 0x29, 0x03);
    assert_sense(&run(&t, &b, &TUR, vec![]).await, 0x06, 0x2A, 0x01);
    assert_good(&run(&t, &b, &TUR, vec![]).await);
    // Again (a first takes its own reset condition), then b's nexus is lost and comes back.
    assert_sense(&run(&t, &a, &TUR, vec![]).await, 0x06, 0x29, 0x03);
    assert_good(&run(&t, &a, &[0x15, 0x10, 0, 0, 16, 0], p).await);
    t.nexus_lost(&b);
    assert_sense(&run(&t, &b, &TUR, vec![]).await, 0x06, 0x29, 0x07);
    assert_sense(&run(&t, &b, &TUR, vec![]).await, 0x06, 0x2A, 0x01);
    assert_good(&run(&t, &b, &TUR, vec![]).await);
}

#[tokio::test]
async fn target_reset_raises_power_on_reset_on_every_nexus() {
    let (t, _, a, b) = gated().await;
    assert_eq!(
        t.task_management(&a, Tmf::TargetWarmReset).await,
        TmfResponse::FunctionComplete
    );
    for n in [&a, &b] {
        let r = run(&t, n, &[0x00, 0, 0, 0, 0, 0], vec![]).await;
        assert_sense(&r, 0x06, 0x29, 0x00);
    }
}

#[tokio::test]
async fn it_nexus_reset_raises_it_nexus_loss_on_that_nexus() {
    let (t, _, a, b) = gated().await;
    assert_eq!(
        t.task_management(&a, Tmf::ItNexusReset).await,
        TmfResponse::FunctionComplete
    );
    let r = run(&t, &a, &[0x00, 0, 0, 0, 0, 0], vec![]).await;
    assert_sense(&r, 0x06, 0x29, 0x07); // I_T NEXUS LOSS OCCURRED
    assert_good(&run(&t, &b, &[0x00, 0, 0, 0, 0, 0], vec![]).await);
}

/// I_T NEXUS RESET waits for the nexus's running write before it answers, but I_T NEXUS
/// LOSS OCCURRED is pending from the start: a command the nexus sends meanwhile reports it
/// rather than completing as if nothing had happened.
#[tokio::test]
async fn it_nexus_reset_raises_its_unit_attention_before_it_waits_for_running_tasks() {
    let (t, d, a, _) = gated().await;
    let w = start_write(&t, &d, &a, 7, 0, 0x11).await;
    let mut tmf = spawn_tmf(&t, &a, Tmf::ItNexusReset);
    assert!(is_pending(&mut tmf).await, "waits for the running write");
    let r = run(&t, &a, &TUR, vec![]).await;
    assert_sense(&r, 0x06, 0x29, 0x07); // I_T NEXUS LOSS OCCURRED
    d.gate.add_permits(1);
    assert_eq!(tmf.await.unwrap(), TmfResponse::FunctionComplete);
    assert_eq!(w.await.unwrap(), Completion::Aborted);
}

#[tokio::test]
async fn query_task_reports_running_tasks() {
    let (t, d, a, _) = gated().await;
    let w = start_write(&t, &d, &a, 9, 0, 1).await;
    assert_eq!(
        t.task_management(&a, Tmf::QueryTask { lun: 0, tag: 9 })
            .await,
        TmfResponse::FunctionSucceeded
    );
    assert_eq!(
        t.task_management(&a, Tmf::QueryTaskSet { lun: 0 }).await,
        TmfResponse::FunctionSucceeded
    );
    d.gate.add_permits(1);
    w.await.unwrap();
    assert_eq!(
        t.task_management(&a, Tmf::QueryTask { lun: 0, tag: 9 })
            .await,
        TmfResponse::FunctionComplete
    );
}

#[tokio::test]
async fn query_async_event_reports_pending_unit_attention() {
    let t = mem_target(64, 512);
    let n = nexus();
    // A nexus the LU has not seen yet has POWER ON, RESET pending: its first command would
    // report it (SAM-5 6.3.1).
    assert_eq!(
        t.task_management(&n, Tmf::QueryAsyncEvent { lun: 0 }).await,
        TmfResponse::FunctionSucceeded
    );
    // INQUIRY does not consume it.
    assert_good(&run(&t, &n, &[0x12, 0, 0, 0, 36, 0], vec![]).await);
    assert_eq!(
        t.task_management(&n, Tmf::QueryAsyncEvent { lun: 0 }).await,
        TmfResponse::FunctionSucceeded
    );
    ready(&t, &n).await;
    assert_eq!(
        t.task_management(&n, Tmf::QueryAsyncEvent { lun: 0 }).await,
        TmfResponse::FunctionComplete
    );
}

#[tokio::test]
async fn clear_aca_is_rejected() {
    let (t, _, a, _) = gated().await;
    assert_eq!(
        t.task_management(&a, Tmf::ClearAca { lun: 0 }).await,
        TmfResponse::FunctionRejected
    );
}

/// SAM-5 6.3.4: a nexus that was lost and comes back reports I_T NEXUS LOSS OCCURRED; a nexus
/// never seen before reports POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
#[tokio::test]
async fn a_lost_nexus_comes_back_with_i_t_nexus_loss_occurred() {
    // Both nexuses have been seen, their power-on unit attentions reported.
    let (t, _, a, _) = gated().await;
    assert_good(&run(&t, &a, &[0x00, 0, 0, 0, 0, 0], vec![]).await);
    t.nexus_lost(&a);
    let r = run(&t, &a, &[0x00, 0, 0, 0, 0, 0], vec![]).await;
    assert_sense(&r, 0x06, 0x29, 0x07); // I_T NEXUS LOSS OCCURRED
    assert_good(&run(&t, &a, &[0x00, 0, 0, 0, 0, 0], vec![]).await);
    let never_seen = nexus_named("iqn.1993-08.org.debian:01:c");
    let r = run(&t, &never_seen, &[0x00, 0, 0, 0, 0, 0], vec![]).await;
    assert_sense(&r, 0x06, 0x29, 0x00);
}

#[tokio::test]
async fn aborted_running_task_of_lost_nexus_completes_as_aborted() {
    let (t, d, a, _) = gated().await;
    let w = start_write(&t, &d, &a, 3, 0, 1).await;
    t.nexus_lost(&a);
    d.gate.add_permits(1);
    assert_eq!(w.await.unwrap(), Completion::Aborted);
}

#[tokio::test]
async fn logical_unit_reset_ends_commands_received_but_not_yet_executing() {
    // SAM-5 7.7: LOGICAL UNIT RESET ends every task in the task set, including one a transport
    // still holds (e.g. an iSCSI write collecting its Data-Out on another session).
    let t = Arc::new(mem_target(64, 512));
    let (a, b) = (nexus(), nexus_named("iqn.1993-08.org.debian:01:b"));
    ready(&t, &a).await;
    ready(&t, &b).await;
    let held = t.admit(&a, 0).expect("LUN 0 exists");
    let r = t
        .task_management(&b, Tmf::LogicalUnitReset { lun: 0 })
        .await;
    assert_eq!(r, TmfResponse::FunctionComplete);
    let c = cmd(&a, 1, &write16(3, 1), vec![0xEE; BS], 0);
    assert_eq!(t.execute_admitted(c, Some(held)).await, Completion::Aborted);
    // Nothing was written; a command received after the reset runs.
    ready(&t, &a).await; // consume BUS DEVICE RESET FUNCTION OCCURRED
    assert_eq!(read_blocks(&t, &a, 3, 1).await, vec![0u8; BS]);
    let after = t.admit(&a, 0).expect("LUN 0 exists");
    let c = cmd(&a, 2, &write16(3, 1), vec![0xEE; BS], 0);
    let Completion::Done(r) = t.execute_admitted(c, Some(after)).await else {
        panic!("a command received after the reset was aborted");
    };
    assert_good(&r);
}

#[tokio::test]
async fn abort_task_set_ends_only_this_nexus_commands_received_but_not_yet_executing() {
    let t = Arc::new(mem_target(64, 512));
    let (a, b) = (nexus(), nexus_named("iqn.1993-08.org.debian:01:b"));
    ready(&t, &a).await;
    ready(&t, &b).await;
    let held_a = t.admit(&a, 0).expect("LUN 0 exists");
    let held_b = t.admit(&b, 0).expect("LUN 0 exists");
    let r = t.task_management(&a, Tmf::AbortTaskSet { lun: 0 }).await;
    assert_eq!(r, TmfResponse::FunctionComplete);
    let c = cmd(&a, 1, &write16(4, 1), vec![0xAA; BS], 0);
    assert_eq!(
        t.execute_admitted(c, Some(held_a)).await,
        Completion::Aborted
    );
    let c = cmd(&b, 1, &write16(5, 1), vec![0xBB; BS], 0);
    let Completion::Done(r) = t.execute_admitted(c, Some(held_b)).await else {
        panic!("the other nexus's command was aborted");
    };
    assert_good(&r);
}

/// SAM-5 5.14: a unit attention is cleared when it is reported. A command that took one and
/// was then aborted reported nothing (its CHECK CONDITION never reaches the initiator), so
/// the condition must still be pending for the next command. The window is between two
/// statements on two threads, so this races them many times: the count of losses it sees
/// is only ever nonzero when one is lost.
#[test]
fn a_unit_attention_taken_by_a_command_aborted_as_it_took_it_is_reported_again() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let t = Arc::new(mem_target(64, 512));
    let tur = [0x00, 0, 0, 0, 0, 0];
    let mut aborted = 0;
    let mut lost = 0;
    // Until enough commands were aborted (about one in 1,500 is, here), with a cap.
    for i in 0..400_000u32 {
        if aborted >= 10 {
            break;
        }
        // A nexus the LU has not seen: its first command reports POWER ON, RESET, OR BUS
        // DEVICE RESET OCCURRED (6h, 29h/00h).
        let n = common::nexus_named(&format!("iqn.2026-01.com.example:race{i}"));
        let go = Arc::new(std::sync::Barrier::new(2));
        let (t1, n1, go1) = (t.clone(), n.clone(), go.clone());
        // Start the two apart by up to a few microseconds, either first.
        let d = i % 512;
        let (wait1, wait2) = if d < 256 {
            (d * 4, 0)
        } else {
            (0, (d - 256) * 4)
        };
        // Each on a thread of its own (`block_on` from two threads): the barrier blocks its
        // thread, and two runtime tasks could both be on one worker (a task spawned from a
        // worker waits in its LIFO slot, which no other worker takes), each waiting for the
        // other for ever.
        let (t2, n2) = (t.clone(), n.clone());
        let h = rt.handle();
        let (first, _) = std::thread::scope(|s| {
            let first = s.spawn(|| {
                h.block_on(async move {
                    go1.wait();
                    for _ in 0..wait1 {
                        std::hint::spin_loop();
                    }
                    t1.execute(cmd(&n1, 7, &tur, vec![], 0)).await
                })
            });
            let abort = s.spawn(|| {
                h.block_on(async move {
                    go.wait();
                    for _ in 0..wait2 {
                        std::hint::spin_loop();
                    }
                    t2.task_management(&n2, Tmf::AbortTask { lun: 0, tag: 7 })
                        .await
                })
            });
            (first.join().unwrap(), abort.join().unwrap())
        });
        match first {
            // Reported: the next command runs.
            Completion::Done(r) => assert_sense(&r, 0x06, 0x29, 0x00),
            Completion::Aborted => {
                aborted += 1;
                let r = rt.block_on(run(&t, &n, &tur, vec![]));
                if r.status == Status::GOOD {
                    lost += 1;
                }
            }
        }
    }
    assert_eq!(lost, 0, "unit attentions lost ({aborted} commands aborted)");
    // The race was run (some commands were aborted), or this test proves nothing.
    assert!(aborted > 0, "no command was aborted");
}

/// A unit attention reported in an answer the frontend could not deliver (task management
/// ended the task after it completed) is pending again (SAM-5 5.14: only reporting it clears
/// it); an undelivered answer of another kind queues nothing.
#[tokio::test]
async fn an_undelivered_unit_attention_is_reported_again() {
    let t = mem_target(64, 512);
    let n = nexus();
    let r = run(&t, &n, &TUR, vec![]).await;
    assert_sense(&r, 0x06, 0x29, 0x00); // POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
    t.undelivered(&n, 0, Some(0x00), &r);
    let again = run(&t, &n, &TUR, vec![]).await;
    assert_sense(&again, 0x06, 0x29, 0x00);
    assert_good(&run(&t, &n, &TUR, vec![]).await);
    // READ(16) beyond the last LBA: ILLEGAL REQUEST, LBA OUT OF RANGE (21h/00h).
    let r = run(&t, &n, &read16(64, 1), vec![]).await;
    assert_sense(&r, 0x05, 0x21, 0x00);
    t.undelivered(&n, 0, Some(0x88), &r);
    assert_good(&run(&t, &n, &TUR, vec![]).await);
    // REQUEST SENSE reports a unit attention in its data, with GOOD (SPC-5 5.14): a LOGICAL
    // UNIT RESET's BUS DEVICE RESET FUNCTION OCCURRED (29h/03h).
    t.task_management(&n, Tmf::LogicalUnitReset { lun: 0 })
        .await;
    let mut c = cmd(&n, 9, &[0x03, 0, 0, 0, 18, 0], vec![], 18); // REQUEST SENSE, 18 bytes
    c.lun = 0;
    let Completion::Done(r) = t.execute(c).await else {
        panic!("aborted")
    };
    assert_good(&r);
    assert_eq!(
        (r.data_in[2] & 0x0f, r.data_in[12], r.data_in[13]),
        (0x06, 0x29, 0x03)
    );
    t.undelivered(&n, 0, Some(0x03), &r);
    assert_sense(&run(&t, &n, &TUR, vec![]).await, 0x06, 0x29, 0x03);
}

/// REPORTED LUNS DATA HAS CHANGED reported through one LU is cleared on the target's others
/// (LUICLR=1); undelivered, it is pending again on all of them.
#[tokio::test]
async fn an_undelivered_reported_luns_changed_is_pending_again_on_every_lu() {
    let mut t = Target::new();
    for lun in [0, 1] {
        let backend =
            block::Backend::new(Arc::new(block::driver::mem::MemDriver::new(64 * 512)), 512)
                .unwrap();
        t.add_lu(lun, Arc::new(scsi::LogicalUnit::new(backend, config())));
    }
    let n = nexus();
    let on = |lun: u64, tag: u64| {
        let mut c = cmd(&n, tag, &TUR, vec![], 0);
        c.lun = lun;
        c
    };
    let sense_of = |done: Completion| match done {
        Completion::Done(r) => r,
        Completion::Aborted => panic!("aborted"),
    };
    for lun in [0, 1] {
        // Each LU's power-on unit attention.
        assert_sense(&sense_of(t.execute(on(lun, 1)).await), 0x06, 0x29, 0x00);
        t.lu(lun).unwrap().reported_luns_changed(&n);
    }
    let r = sense_of(t.execute(on(0, 2)).await);
    assert_sense(&r, 0x06, 0x3F, 0x0E); // REPORTED LUNS DATA HAS CHANGED
    t.undelivered(&n, 0, Some(0x00), &r);
    assert_sense(&sense_of(t.execute(on(1, 3)).await), 0x06, 0x3F, 0x0E);
}

/// A LOGICAL UNIT RESET resets the mode pages and establishes its unit attention when it is
/// received (SAM-5 6.3.5), not once the tasks it aborted have finished: a MODE SELECT another
/// initiator sends while the reset waits for a running write comes after the reset, reports
/// its unit attention first, and stands.
#[tokio::test]
async fn a_mode_select_sent_while_a_reset_waits_stands() {
    let (t, d, a, b) = gated().await;
    let w = start_write(&t, &d, &a, 5, 0, 0x11).await;
    let mut reset = spawn_tmf(&t, &a, Tmf::LogicalUnitReset { lun: 0 });
    assert!(
        is_pending(&mut reset).await,
        "the reset waits for the write"
    );
    // BUS DEVICE RESET FUNCTION OCCURRED (29h/03h).
    assert_sense(&run(&t, &b, &TUR, vec![]).await, 0x06, 0x29, 0x03);
    // MODE SELECT(6), PF, the caching page (08h, length 12h) with WCE (byte 2 bit 2) 0.
    let mut p = vec![0, 0, 0, 0, 0x08, 0x12, 0x00];
    p.resize(24, 0);
    assert_good(&run(&t, &b, &[0x15, 0x10, 0, 0, 24, 0], p).await);
    d.gate.add_permits(100);
    assert_eq!(reset.await.unwrap(), TmfResponse::FunctionComplete);
    assert_eq!(w.await.unwrap(), Completion::Aborted);
    // MODE SENSE(6), DBD, current values of the caching page: header (4 bytes), then the
    // page: code 08h, length 12h, WCE in its byte 2.
    let r = run(&t, &b, &[0x1A, 0x08, 0x08, 0, 255, 0], vec![]).await;
    assert_good(&r);
    assert_eq!(
        (r.data_in[4], r.data_in[6] & 0x04),
        (0x08, 0x00),
        "WCE stays 0"
    );
}
