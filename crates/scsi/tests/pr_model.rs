#![allow(clippy::unwrap_used)]

//! Property test: random sequences of PERSISTENT RESERVE OUT commands from four I_T nexuses
//! against a small model of SPC-5 5.14 written here, independently of crate::pr.
//!
//! Nexuses: 0 = iqn.x ISID 1 on target port 1, 1 = iqn.x ISID 2 on target port 1 (same
//! initiator, another ISID), 2 = iqn.y on target port 1, 3 = iqn.x ISID 1 on target port 2 (the
//! initiator port of nexus 0 through another target port, so ALL_TG_PT covers nexuses 0 and 3).
//!
//! The model: a list of registrations, each a set of nexus numbers and a key, in registration
//! order; an optional reservation (type, and the holding registration's nexus set or "all
//! registrants"); the generation and APTPL. After every command the outcome (GOOD, RESERVATION
//! CONFLICT, or the sense key/ASC/ASCQ), READ KEYS, READ RESERVATION and REPORT CAPABILITIES'
//! PTPL_A must agree.

use proptest::prelude::*;
use scsi::pr::input::input;
use scsi::pr::out::{out_with_ports, Refusal};
use scsi::pr::PrState;
use scsi::{InitiatorPort, ItNexus, TargetPort, Transport};

const NEXUSES: usize = 4;

fn tport(rtpi: u16) -> TargetPort {
    TargetPort {
        name: "iqn.2026-01.io.sharedisk:t".into(),
        tpgt: rtpi,
        relative_id: rtpi,
    }
}

/// (initiator name, ISID last byte, relative target port identifier) of each nexus.
const SPEC: [(&str, u8, u16); NEXUSES] = [
    ("iqn.x", 1, 1),
    ("iqn.x", 2, 1),
    ("iqn.y", 1, 1),
    ("iqn.x", 1, 2),
];

fn nexus(i: usize) -> ItNexus {
    let (name, isid, rtpi) = SPEC[i];
    ItNexus {
        initiator: InitiatorPort {
            transport: Transport::Iscsi,
            name: name.into(),
            isid: Some([0x80, 0, 0, 0, 0, isid]),
        },
        target: tport(rtpi),
    }
}

/// The nexuses sharing nexus `i`'s initiator port (what ALL_TG_PT registers).
fn same_port(i: usize) -> Vec<usize> {
    (0..NEXUSES)
        .filter(|&j| SPEC[j].0 == SPEC[i].0 && SPEC[j].1 == SPEC[i].1)
        .collect()
}

/// iSCSI TransportID, format 01b, of nexus `i`'s initiator port (SPC-5 7.6.4.6).
fn tid(i: usize) -> Vec<u8> {
    let (name, isid, _) = SPEC[i];
    let text = format!("{name},i,0x80000000000{isid:x}");
    let mut t = vec![0x45, 0x00, 0x00, 0x00];
    t.extend_from_slice(text.as_bytes());
    t.push(0);
    while t.len() % 4 != 0 || t.len() < 24 {
        t.push(0);
    }
    let add = (t.len() - 4) as u16;
    t[2..4].copy_from_slice(&add.to_be_bytes());
    t
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Holder {
    One(Vec<usize>),
    All,
}

#[derive(Debug, Clone, Default)]
struct Model {
    regs: Vec<(Vec<usize>, u64)>,
    res: Option<(u8, Holder)>,
    generation: u32,
    aptpl: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Good,
    Conflict,
    Check(u8, u8, u8),
}

const INVALID_FIELD_CDB: Outcome = Outcome::Check(0x05, 0x24, 0x00);
const INVALID_FIELD_PARAM: Outcome = Outcome::Check(0x05, 0x26, 0x00);
const INVALID_RELEASE: Outcome = Outcome::Check(0x05, 0x26, 0x04);

fn all_registrants(ty: u8) -> bool {
    ty == 7 || ty == 8
}

impl Model {
    fn reg_of(&self, n: usize) -> Option<usize> {
        self.regs.iter().position(|(set, _)| set.contains(&n))
    }

    fn is_holder(&self, n: usize) -> bool {
        match &self.res {
            None => false,
            Some((_, Holder::One(set))) => set.contains(&n),
            Some((_, Holder::All)) => self.reg_of(n).is_some(),
        }
    }

    fn holder_for(ty: u8, set: &[usize]) -> Holder {
        if all_registrants(ty) {
            Holder::All
        } else {
            Holder::One(set.to_vec())
        }
    }

    fn remove(&mut self, i: usize) {
        let (set, _) = self.regs.remove(i);
        match &self.res {
            Some((_, Holder::One(h))) if *h == set => self.res = None,
            Some((_, Holder::All)) if self.regs.is_empty() => self.res = None,
            _ => {}
        }
    }

    fn bump(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    fn apply(&mut self, c: &Cmd) -> Outcome {
        use Outcome::*;
        let n = c.nexus;
        if c.sa > 8 {
            return INVALID_FIELD_CDB;
        }
        // RELEASE (2) compares TYPE with the reservation it releases, whatever its value.
        if matches!(c.sa, 1 | 4 | 5 | 8) && !matches!(c.ty, 1 | 3 | 5 | 6 | 7 | 8) {
            return INVALID_FIELD_CDB;
        }
        if c.sa == 8 {
            // REPLACE LOST RESERVATION when nothing was lost (never, in these sequences).
            return INVALID_RELEASE;
        }
        let mine = self.reg_of(n);
        // Every service action but REGISTER AND IGNORE EXISTING KEY and REGISTER from an
        // unregistered nexus needs a registration with the given key.
        let key_ok = mine.is_some_and(|i| self.regs[i].1 == c.rk);
        match c.sa {
            0 | 6 => {
                let ignore = c.sa == 6;
                match mine {
                    None => {
                        if !ignore && c.rk != 0 {
                            return Conflict;
                        }
                        if c.sark == 0 {
                            return Good;
                        }
                        let set = if c.all_tg_pt { same_port(n) } else { vec![n] };
                        if set.iter().any(|&m| self.reg_of(m).is_some()) {
                            return INVALID_FIELD_PARAM;
                        }
                        self.regs.push((set, c.sark));
                    }
                    Some(i) => {
                        if !ignore && !key_ok {
                            return Conflict;
                        }
                        if c.sark == 0 {
                            self.remove(i);
                        } else {
                            self.regs[i].1 = c.sark;
                        }
                    }
                }
                self.aptpl = c.aptpl;
                self.bump();
                Good
            }
            1 => {
                if !key_ok {
                    return Conflict;
                }
                match &self.res {
                    None => {
                        let set = self.regs[mine.unwrap()].0.clone();
                        self.res = Some((c.ty, Self::holder_for(c.ty, &set)));
                        Good
                    }
                    Some((ty, _)) if self.is_holder(n) && *ty == c.ty => Good,
                    Some(_) => Conflict,
                }
            }
            2 => {
                if !key_ok {
                    return Conflict;
                }
                match &self.res {
                    None => Good,
                    Some(_) if !self.is_holder(n) => Good,
                    Some((ty, _)) if *ty != c.ty => INVALID_RELEASE,
                    Some(_) => {
                        self.res = None;
                        Good
                    }
                }
            }
            3 => {
                if !key_ok {
                    return Conflict;
                }
                self.regs.clear();
                self.res = None;
                self.bump();
                Good
            }
            4 | 5 => {
                if !key_ok {
                    return Conflict;
                }
                let me = self.regs[mine.unwrap()].0.clone();
                let ar = self
                    .res
                    .as_ref()
                    .is_some_and(|(ty, _)| all_registrants(*ty));
                if ar && c.sark == 0 {
                    self.regs.retain(|(set, _)| *set == me);
                    self.res = Some((c.ty, Self::holder_for(c.ty, &me)));
                    self.bump();
                    return Good;
                }
                if c.sark == 0 {
                    return INVALID_FIELD_PARAM;
                }
                if !self.regs.iter().any(|(_, k)| *k == c.sark) {
                    return Conflict;
                }
                let preempts = match &self.res {
                    Some((_, Holder::One(h))) => {
                        self.regs.iter().any(|(set, k)| set == h && *k == c.sark)
                    }
                    _ => false,
                };
                // Preempting the reservation keeps the sender's registration; only removing
                // registrations removes it too when the key names it.
                self.regs
                    .retain(|(set, k)| *k != c.sark || (preempts && *set == me));
                if preempts {
                    self.res = Some((c.ty, Self::holder_for(c.ty, &me)));
                } else if ar && self.regs.is_empty() {
                    self.res = None;
                }
                self.bump();
                Good
            }
            7 => {
                if !key_ok {
                    return Conflict;
                }
                let src = self.regs[mine.unwrap()].0.clone();
                // Nothing to move: INVALID FIELD IN CDB (SPC-5 5.14.8).
                let ty = match &self.res {
                    None => return INVALID_FIELD_CDB,
                    Some((ty, Holder::One(_))) if self.is_holder(n) => *ty,
                    _ => return Conflict,
                };
                if c.sark == 0 {
                    return INVALID_FIELD_PARAM;
                }
                // Not a nexus of the source registration, nor the sender's own initiator port
                // through another target port.
                let d = c.dest;
                if src.contains(&d) || (SPEC[d].0 == SPEC[n].0 && SPEC[d].1 == SPEC[n].1) {
                    return INVALID_FIELD_PARAM;
                }
                let holder = match self.reg_of(d) {
                    Some(j) => {
                        self.regs[j].1 = c.sark;
                        self.regs[j].0.clone()
                    }
                    None => {
                        self.regs.push((vec![d], c.sark));
                        vec![d]
                    }
                };
                self.res = Some((ty, Holder::One(holder)));
                if c.unreg {
                    self.regs.retain(|(set, _)| *set != src);
                }
                self.aptpl = c.aptpl;
                self.bump();
                Good
            }
            _ => unreachable!(),
        }
    }

    fn read_keys(&self) -> Vec<u8> {
        let mut d = self.generation.to_be_bytes().to_vec();
        d.extend_from_slice(&(8 * self.regs.len() as u32).to_be_bytes());
        for (_, k) in &self.regs {
            d.extend_from_slice(&k.to_be_bytes());
        }
        d
    }

    fn read_reservation(&self) -> Vec<u8> {
        let mut d = self.generation.to_be_bytes().to_vec();
        match &self.res {
            None => d.extend_from_slice(&[0, 0, 0, 0]),
            Some((ty, h)) => {
                d.extend_from_slice(&[0, 0, 0, 16]);
                let key = match h {
                    Holder::All => 0,
                    Holder::One(set) => self
                        .regs
                        .iter()
                        .find(|(s, _)| s == set)
                        .map_or(0xBAD, |r| r.1),
                };
                d.extend_from_slice(&key.to_be_bytes());
                d.extend_from_slice(&[0, 0, 0, 0, 0, *ty, 0, 0]);
            }
        }
        d
    }
}

#[derive(Debug, Clone)]
struct Cmd {
    nexus: usize,
    sa: u8,
    ty: u8,
    rk: u64,
    sark: u64,
    aptpl: bool,
    all_tg_pt: bool,
    dest: usize,
    unreg: bool,
    /// Use the nexus's registered key as RESERVATION KEY (so most commands get past the key
    /// check) instead of `rk`.
    right_key: bool,
}

fn cmd() -> impl Strategy<Value = Cmd> {
    (
        0..NEXUSES,
        prop_oneof![10 => 0u8..8, 1 => Just(8u8)],
        prop_oneof![6 => prop::sample::select(vec![1u8, 3, 5, 6, 7, 8]), 1 => Just(2u8)],
        0u64..4,
        0u64..4,
        any::<bool>(),
        prop::bool::weighted(0.2),
        0..NEXUSES,
        any::<bool>(),
        prop::bool::weighted(0.8),
    )
        .prop_map(
            |(nexus, sa, ty, rk, sark, aptpl, all_tg_pt, dest, unreg, right_key)| Cmd {
                nexus,
                sa,
                ty,
                rk,
                sark,
                aptpl,
                all_tg_pt,
                dest,
                unreg,
                right_key,
            },
        )
}

fn param(c: &Cmd, rk: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&rk.to_be_bytes());
    p.extend_from_slice(&c.sark.to_be_bytes());
    if c.sa == 7 {
        // SPC-5 6.17.5: reserved, UNREG/APTPL, RELATIVE TARGET PORT IDENTIFIER, TransportID.
        let t = tid(c.dest);
        p.push(0);
        p.push((u8::from(c.unreg) << 1) | u8::from(c.aptpl));
        p.extend_from_slice(&SPEC[c.dest].2.to_be_bytes());
        p.extend_from_slice(&(t.len() as u32).to_be_bytes());
        p.extend_from_slice(&t);
    } else {
        // SPC-5 6.17.3: obsolete, ALL_TG_PT/APTPL, reserved, obsolete.
        p.extend_from_slice(&[0, 0, 0, 0]);
        p.push((u8::from(c.all_tg_pt) << 2) | u8::from(c.aptpl));
        p.extend_from_slice(&[0, 0, 0]);
    }
    p
}

fn invariants(s: &PrState) {
    // No I_T nexus has two registrations.
    for n in 0..NEXUSES {
        let nx = nexus(n);
        assert!(
            s.registrations
                .iter()
                .filter(|r| r.who.matches(&nx))
                .count()
                <= 1
        );
    }
    if let Some(r) = &s.reservation {
        assert!(
            !s.registrations.is_empty(),
            "a reservation outlived every registration"
        );
        match &r.holder {
            Some(h) => assert!(s.registrations.iter().any(|g| g.who == *h)),
            None => assert!(r.ty.all_registrants()),
        }
    }
    // Every state the rules make is one a restart reads back as a state, not as lost.
    assert_eq!(s.check_consistent(), Ok(()));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn pr_out_sequences_agree_with_the_model(cmds in prop::collection::vec(cmd(), 1..40)) {
        let ports = [tport(1), tport(2)].map(|port| scsi::ServedPort { port, transport: scsi::Transport::Iscsi });
        let mut state = PrState::default();
        let mut model = Model::default();
        for c in &cmds {
            let mut c = c.clone();
            if c.right_key {
                if let Some(i) = model.reg_of(c.nexus) {
                    c.rk = model.regs[i].1;
                }
            }
            let want = model.apply(&c);
            let got = match out_with_ports(&state, &nexus(c.nexus), c.sa, 0, c.ty, &param(&c, c.rk), &ports) {
                Ok(e) => {
                    prop_assert_eq!(e.changed, e.state != state);
                    state = e.state;
                    Outcome::Good
                }
                Err(Refusal::Conflict) => Outcome::Conflict,
                Err(Refusal::Check(s)) => Outcome::Check(s.key, s.asc, s.ascq),
            };
            prop_assert_eq!(got, want, "command {:?}", c);
            invariants(&state);
            prop_assert_eq!(input(&state, 0, u16::MAX).unwrap(), model.read_keys(), "READ KEYS after {:?}", c);
            prop_assert_eq!(input(&state, 1, u16::MAX).unwrap(), model.read_reservation(), "READ RESERVATION after {:?}", c);
            prop_assert_eq!(input(&state, 2, 8).unwrap()[3] & 1, u8::from(model.aptpl));
        }
    }
}
