//! The logical unit's side of reservations (DESIGN.md §4): the snapshot every command is
//! checked against, and the commands that change it.
//!
//! - The per-command check ([`Reservations::allowed`]) loads one `Arc` from an [`ArcSwap`]: no
//!   lock and no I/O on the hot path.
//! - Commands that change reservations (PERSISTENT RESERVE OUT, RESERVE, RELEASE) run one at a
//!   time per LU under [`Reservations::lock`]. The logical unit takes that lock before the
//!   command starts (so task management can end a waiting one without waiting for it) and
//!   checks the command against the snapshot under the lock.
//! - A PERSISTENT RESERVE OUT computes the next state with the pure rules of [`crate::pr`],
//!   stores it through the block driver's [`block::ReservationStore`] (compare-and-swap on the
//!   version it was computed from; durable when APTPL is set), publishes the snapshot, and
//!   answers once the store's barrier says every other holder has seen it. A state another
//!   holder stored first is adopted and the command is evaluated again on it. The snapshot
//!   only moves forward in version.
//! - SPC-2 RESERVE/RELEASE keep their holder in the snapshot but not in the store: SPC-2
//!   reservations do not survive a reset, a nexus loss or a restart.
//! - A state the store lost ([`ReservationStore::lost`]: the file driver's damaged sidecar), or
//!   a stored state of this format that does not parse or is not one the rules could make
//!   ([`PrState::check_consistent`]), is loaded as [`PrState::lost`]: the
//!   recoverable lost persistent reservation condition of [`crate::pr`]. The per-command check
//!   then terminates every command but a few with PERSISTENT RESERVATION INFORMATION LOST, and
//!   a REPLACE LOST RESERVATION stores its new state over the lost one like any other PR OUT.
//!   A stored state of another format number (another version of sharedisk) is not loss: the
//!   LU does not start.

use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use block::{BlockError, ReservationStore, Stored};
use serde::{Deserialize, Serialize};

use crate::cdb::OpInfo;
use crate::pr::out::{Effects, Refusal};
use crate::pr::spc2::{self, Spc2Outcome};
use crate::pr::{self, PrState};
use crate::ItNexus;

/// What the per-command check reads.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// The store's version of `pr` (0: nothing stored yet).
    pub version: u64,
    pub pr: Arc<PrState>,
    /// The SPC-2 RESERVE holder: kept by this process only.
    pub spc2: Option<Arc<ItNexus>>,
}

/// The reservation state of one LU.
#[derive(Debug, Default)]
pub(crate) struct Reservations {
    snap: ArcSwap<Snapshot>,
    change: tokio::sync::Mutex<()>,
    /// The LU's id (the value behind its NAA identifier): the owner the stored form names.
    lu: u64,
}

/// Why a reservation-changing command failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The rules refused it; nothing changed.
    Refused(Refusal),
    /// The store failed; nothing changed.
    Store(BlockError),
    /// The stored state could not be decoded.
    Corrupt(String),
}

/// The stored form: a format number, the logical unit it belongs to and the state, as JSON,
/// so an operator can read the file driver's sidecar.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredForm {
    format: u32,
    /// The 64-bit value behind the NAA identifier (VPD 0x83) of the logical unit that stored
    /// it, as `0x` and 16 hex digits. Absent in states stored before it was written (those
    /// are read as this LU's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lu: Option<String>,
    state: PrState,
}

/// How the stored form names the logical unit `id`.
fn lu_name(id: u64) -> String {
    format!("{id:#018x}")
}

const FORMAT: u32 = 1;

/// Only the format number of a stored form, to tell a damaged state from another version's.
#[derive(Deserialize)]
struct FormatOnly {
    format: u32,
}

/// Serialise `state` of the logical unit `lu` (its NAA identifier's value) for the reservation
/// store.
pub fn encode(state: &PrState, lu: u64) -> Vec<u8> {
    let form = StoredForm {
        format: FORMAT,
        lu: Some(lu_name(lu)),
        state: state.clone(),
    };
    // Serialising plain structs of strings, integers and enums to JSON cannot fail.
    serde_json::to_vec_pretty(&form).unwrap_or_default()
}

/// Read a state the reservation store holds for the logical unit `lu`.
///
/// A state that names another LU is read all the same, with a warning naming both ids. It is
/// either a state file a configuration edit moved to another LU, or this LU's own under an id
/// that changed: a derived id follows the image's canonical path, which for a block device
/// can change at a reboot (`/dev/sdb` becoming `/dev/sdc` behind a stable `/dev/disk/by-id`
/// link). Refusing it (or calling it lost) would stop every initiator's I/O in the second,
/// common case; the cross-process lock and the in-process claim on state files already keep
/// two LUs from sharing one at the same time.
pub fn decode(bytes: &[u8], lu: u64) -> Result<PrState, String> {
    let form: StoredForm =
        serde_json::from_slice(bytes).map_err(|e| format!("not a reservation state: {e}"))?;
    if form.format != FORMAT {
        return Err(format!(
            "reservation state format {} (this version reads {FORMAT})",
            form.format
        ));
    }
    if let Some(owner) = form.lu.filter(|o| *o != lu_name(lu)) {
        tracing::warn!(
            stored_by = %owner,
            this_lu = %lu_name(lu),
            "The persistent reservation state was stored by the logical unit with another id; \
             it is used as this one's. If the state file belongs to another disk, stop the \
             daemon and name the right file; if this is the same disk and its id changed (a \
             derived id follows the image's path), configure id = {owner} to keep the identity \
             initiators know it by"
        );
    }
    // A state stored before iSCSI names were case folded may hold a name with capitals; its
    // initiator now logs in under the folded name, which must still find its registration.
    let mut state = form.state;
    let fold = |who: &mut crate::pr::Registrant| {
        who.initiator = who.initiator.clone().folded();
    };
    let spelled: Vec<_> = state.registrations.iter().map(|r| r.who.clone()).collect();
    state
        .registrations
        .iter_mut()
        .for_each(|r| fold(&mut r.who));
    if let Some(h) = state.reservation.as_mut().and_then(|r| r.holder.as_mut()) {
        fold(h);
    }
    // Two registrations whose names differ only in case are one I_T nexus's: the first (the
    // older) stands, rather than a state the rules could not make, which would be lost. (Two
    // spelled alike are a damaged state, as before.)
    let mut kept: Vec<(crate::pr::Registrant, &crate::pr::Registrant)> = Vec::new();
    let mut i = 0;
    state.registrations.retain(|r| {
        let original = &spelled[i];
        i += 1;
        match kept.iter().find(|(who, _)| *who == r.who) {
            Some((_, first)) if *first != original => {
                tracing::warn!(
                    initiator = %r.who.initiator.port_name(),
                    key = r.key,
                    "Restored reservation state: a second registration of one I_T nexus (its \
                     initiator name differed only in case) is dropped"
                );
                false
            }
            _ => {
                kept.push((r.who.clone(), original));
                true
            }
        }
    });
    state
        .check_consistent()
        .map_err(|why| format!("not a state the rules could make: {why}"))?;
    Ok(state)
}

/// How many times a PERSISTENT RESERVE OUT is evaluated again on a state another holder stored
/// first, before it gives up.
const CAS_ATTEMPTS: usize = 8;

impl Reservations {
    /// The reservations of the logical unit whose NAA identifier's value is `lu`.
    pub fn new(lu: u64) -> Self {
        Reservations {
            lu,
            ..Reservations::default()
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.load_full()
    }

    /// The per-command check: whether `nexus` may run the command `info` describes now.
    /// `Err(Refusal::Conflict)`: RESERVATION CONFLICT; `Err(Refusal::Check(_))`: PERSISTENT
    /// RESERVATION INFORMATION LOST while the state is lost.
    #[inline]
    pub fn allowed(&self, nexus: &ItNexus, info: &OpInfo, cdb: &[u8]) -> Result<(), Refusal> {
        let s = self.snap.load();
        if s.pr.lost {
            if !pr::check::lost_allows(info, cdb) {
                return Err(Refusal::Check(pr::INFORMATION_LOST));
            }
            // SPC-5 5.13.5.3.2 a): REPLACE LOST RESERVATION is not terminated with
            // RESERVATION CONFLICT while the information is lost.
            if info.opcode == 0x5F {
                return Ok(());
            }
        }
        if let Some(holder) = &s.spc2 {
            if !spc2::allowed(holder, nexus, info, cdb) {
                return Err(Refusal::Conflict);
            }
        }
        if pr::check::allowed(&s.pr, nexus, info, cdb) {
            Ok(())
        } else {
            Err(Refusal::Conflict)
        }
    }

    /// Serialise a reservation-changing command against the others on this LU.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.change.lock().await
    }

    /// Make `pr` (the store's `version`) the snapshot, unless the snapshot is already newer:
    /// a change another holder stored (followed from the store's watch) and this LU's own
    /// PR OUT may publish in either order, and the snapshot never goes back a version.
    fn publish(&self, version: u64, pr: Arc<PrState>) {
        self.snap.rcu(|s| {
            if s.version > version {
                return s.clone();
            }
            Arc::new(Snapshot {
                version,
                pr: pr.clone(),
                spc2: s.spc2.clone(),
            })
        });
    }

    /// Make a stored state the snapshot. `power_on`: the state kept through power loss, read
    /// back as the device server starts: its PRGENERATION starts again at zero (SPC-5 6.16.2,
    /// READ KEYS: "Regardless of the APTPL bit value the PRgeneration value shall be set to
    /// zero by a power on"); registrations and reservation are kept as stored. The store is
    /// not rewritten for that: the next change stores its own generation.
    fn adopt(&self, stored: &Stored, power_on: bool) -> Result<(), Failure> {
        let mut pr = if stored.state.is_empty() {
            PrState::default()
        } else {
            decode(&stored.state, self.lu).map_err(Failure::Corrupt)?
        };
        if power_on {
            pr.generation = 0;
        }
        self.publish(stored.version, Arc::new(pr));
        Ok(())
    }

    /// Load the stored state (at startup), and follow changes other holders make. `Ok(Some(why))`:
    /// the stored state was lost, and the snapshot is [`PrState::lost`].
    pub async fn restore(
        self: &Arc<Self>,
        store: &Arc<dyn ReservationStore>,
    ) -> Result<Option<String>, Failure> {
        let stored = store.load().await.map_err(Failure::Store)?;
        let lost = match store.lost() {
            Some(why) => Some(why),
            None => match self.adopt(&stored, true) {
                Ok(()) => None,
                Err(Failure::Corrupt(why)) => {
                    // Checksummed by the store, yet not a state: lost, unless it is the form of
                    // another version (which this one must not overwrite).
                    match serde_json::from_slice::<FormatOnly>(&stored.state) {
                        Ok(f) if f.format != FORMAT => return Err(Failure::Corrupt(why)),
                        _ => Some(why),
                    }
                }
                Err(f) => return Err(f),
            },
        };
        if lost.is_some() {
            self.publish(stored.version, Arc::new(PrState::lost()));
        }
        let mut changes = store.watch();
        let me: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let stored = changes.borrow_and_update().clone();
                let Some(me) = me.upgrade() else { break };
                if stored.version > me.snap.load().version {
                    // `adopt` publishes only if still newer when it swaps.
                    if let Err(e) = me.adopt(&stored, false) {
                        tracing::error!(error = ?e, "Cannot read a reservation state stored elsewhere");
                    }
                }
            }
        });
        Ok(lost)
    }

    /// Store `next` as the successor of the snapshot's version and publish it. `Ok(false)`:
    /// another holder stored a state first; it is now the snapshot.
    async fn store(
        &self,
        store: &Arc<dyn ReservationStore>,
        version: u64,
        next: &PrState,
    ) -> Result<bool, Failure> {
        match store
            .compare_and_swap(version, encode(next, self.lu), next.aptpl)
            .await
            .map_err(Failure::Store)?
        {
            Ok(v) => {
                // Stored is in force: publish before the barrier, so a failing barrier cannot
                // leave this LU checking commands against a state the store has replaced. The
                // command then fails (the other holders may not all have seen it yet), but the
                // state stands, as READ KEYS shows.
                self.publish(v, Arc::new(next.clone()));
                store.barrier(v).await.map_err(Failure::Store)?;
                Ok(true)
            }
            Err(now) => {
                self.adopt(&now, false)?;
                Ok(false)
            }
        }
    }

    /// Compute the next state from the snapshot with `step`, store it (when `step` says what to
    /// store) and publish it; on a state another holder stored first, evaluate `step` again on
    /// that one. Returns `step`'s result and the state it was computed from.
    async fn update<T>(
        &self,
        store: &Arc<dyn ReservationStore>,
        step: impl Fn(&PrState) -> Result<T, Failure>,
        next: impl Fn(&T) -> Option<&PrState>,
    ) -> Result<(T, Arc<PrState>), Failure> {
        for _ in 0..CAS_ATTEMPTS {
            let cur = self.snap.load_full();
            let done = step(&cur.pr)?;
            let stored = match next(&done) {
                None => true,
                Some(state) => self.store(store, cur.version, state).await?,
            };
            if stored {
                return Ok((done, cur.pr.clone()));
            }
        }
        Err(Failure::Store(BlockError::WriteFailed(
            std::io::Error::other("the reservation state kept changing under this command"),
        )))
    }

    /// Run a PERSISTENT RESERVE OUT (the caller holds [`Self::lock`]): compute the next state,
    /// store it and publish it. The caller carries out the effects (unit attentions, aborts).
    pub async fn out(
        &self,
        store: &Arc<dyn ReservationStore>,
        nexus: &ItNexus,
        cdb: (u8, u8, u8),
        param: &[u8],
        target_ports: &[crate::ServedPort],
    ) -> Result<Effects, Failure> {
        let (sa, scope, ty) = cdb;
        let keeps_aptpl = store.keeps_aptpl();
        let step = |pr: &PrState| {
            let eff = pr::out::out_with_ports(pr, nexus, sa, scope, ty, param, target_ports)
                .map_err(Failure::Refused)?;
            match pr::out::unsupported_aptpl(sa, param) {
                Some(r) if !keeps_aptpl => Err(Failure::Refused(r)),
                _ => Ok(eff),
            }
        };
        fn changed(eff: &Effects) -> Option<&PrState> {
            eff.changed.then_some(&eff.state)
        }
        Ok(self.update(store, step, changed).await?.0)
    }

    /// Replace the whole persistent reservation state with `next(old)` (the caller holds
    /// [`Self::lock`]); returns the old state.
    pub async fn replace(
        &self,
        store: &Arc<dyn ReservationStore>,
        next: impl Fn(&PrState) -> PrState,
    ) -> Result<Arc<PrState>, Failure> {
        fn whole(state: &PrState) -> Option<&PrState> {
            Some(state)
        }
        let step = |pr: &PrState| Ok(next(pr));
        Ok(self.update(store, step, whole).await?.1)
    }

    /// SPC-2 RESERVE(6/10) from `nexus` (the caller holds [`Self::lock`]).
    pub fn reserve(&self, nexus: &Arc<ItNexus>) -> Result<(), Refusal> {
        let cur = self.snap.load();
        let outcome = spc2::reserve(&cur.pr, cur.spc2.as_deref(), nexus)?;
        self.set_spc2(outcome, nexus);
        Ok(())
    }

    /// SPC-2 RELEASE(6/10) from `nexus` (the caller holds [`Self::lock`]).
    pub fn release(&self, nexus: &Arc<ItNexus>) -> Result<(), Refusal> {
        let cur = self.snap.load();
        let outcome = spc2::release(&cur.pr, cur.spc2.as_deref(), nexus)?;
        self.set_spc2(outcome, nexus);
        Ok(())
    }

    fn set_spc2(&self, outcome: Spc2Outcome, nexus: &Arc<ItNexus>) {
        let holder = match outcome {
            Spc2Outcome::Reserved => Some(nexus.clone()),
            Spc2Outcome::Released => None,
            Spc2Outcome::NoChange => return,
        };
        self.snap.rcu(|s| Snapshot {
            version: s.version,
            pr: s.pr.clone(),
            spc2: holder.clone(),
        });
    }

    /// Release the SPC-2 reservation if `pred` matches its holder (LU reset: any holder; I_T
    /// nexus loss or reset: that nexus).
    pub fn release_spc2_if(&self, pred: impl Fn(&ItNexus) -> bool) {
        self.snap.rcu(|s| Snapshot {
            version: s.version,
            pr: s.pr.clone(),
            spc2: s.spc2.clone().filter(|h| !pred(h)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_form_round_trips_and_names_its_format() {
        let state = PrState {
            generation: 3,
            aptpl: true,
            ..PrState::default()
        };
        let bytes = encode(&state, 0x5200_4567_ba64_678d);
        let text = String::from_utf8(bytes.clone()).expect("JSON is UTF-8");
        assert!(text.contains("\"format\": 1"), "{text}");
        assert!(text.contains("\"lu\": \"0x52004567ba64678d\""), "{text}");
        assert_eq!(decode(&bytes, 0x5200_4567_ba64_678d), Ok(state.clone()));
        // Another LU's id: read all the same (and warned about).
        assert_eq!(decode(&bytes, 0x5200_4567_ba64_678e), Ok(state));
    }

    /// A state stored with an iSCSI initiator name in capitals (before names were case
    /// folded) reads back folded, holder included, so that the initiator, which now logs in
    /// under the folded name, still finds its registration and its reservation.
    #[test]
    fn iscsi_names_of_a_stored_state_read_back_case_folded() {
        use crate::pr::{PrType, Registrant, Registration, Reservation};
        use crate::{InitiatorPort, TargetPort, Transport};
        let who = |name: &str| Registrant {
            initiator: InitiatorPort {
                transport: Transport::Iscsi,
                name: name.into(),
                isid: Some([0x80, 0, 0, 0, 0, 1]),
            },
            target: Some(TargetPort {
                name: "iqn.2026-01.io.sharedisk:t".into(),
                tpgt: 1,
                relative_id: 1,
            }),
        };
        let state = |name: &str| PrState {
            generation: 2,
            aptpl: true,
            registrations: vec![Registration {
                who: who(name),
                key: 0x1234,
            }],
            reservation: Some(Reservation {
                ty: PrType::WriteExclusiveRegistrantsOnly,
                scope: 0,
                holder: Some(who(name)),
            }),
            lost: false,
        };
        let stored = encode(&state("iqn.2026-01.com.Example:Host1"), 1);
        assert_eq!(
            decode(&stored, 1),
            Ok(state("iqn.2026-01.com.example:host1"))
        );
        // The same nexus registered twice under two spellings: one registration, the first.
        let mut twice = state("iqn.2026-01.com.example:host1");
        twice.registrations.push(Registration {
            who: who("iqn.2026-01.com.Example:HOST1"),
            key: 0x5678,
        });
        let stored = encode(&twice, 1);
        assert_eq!(
            decode(&stored, 1),
            Ok(state("iqn.2026-01.com.example:host1"))
        );
    }

    #[test]
    fn a_state_stored_before_lost_existed_reads_as_not_lost() {
        let old = br#"{"format": 1, "state": {"generation": 7, "aptpl": true,
            "registrations": [], "reservation": null}}"#;
        let state = decode(old, 1).expect("decodes");
        assert_eq!(state.generation, 7);
        assert!(!state.lost);
    }

    #[test]
    fn the_snapshot_never_goes_back_a_version() {
        let r = Reservations::default();
        let newer = PrState {
            generation: 5,
            ..PrState::default()
        };
        r.publish(5, Arc::new(newer.clone()));
        // A change followed from the store's watch that arrives after this LU's own newer one.
        r.publish(3, Arc::new(PrState::default()));
        let s = r.snapshot();
        assert_eq!((s.version, &*s.pr), (5, &newer));
        r.publish(6, Arc::new(PrState::default()));
        assert_eq!(r.snapshot().version, 6);
    }

    #[test]
    fn a_damaged_or_foreign_state_is_an_error_not_an_empty_state() {
        assert!(decode(b"{\"format\": 1, \"state\": {\"generation\"", 1).is_err());
        assert!(decode(b"{\"format\": 2, \"state\": {}}", 1).is_err());
        assert!(decode(b"", 1).is_err());
    }
}
