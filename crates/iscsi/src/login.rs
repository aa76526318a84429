//! The login phase (RFC 7143 6.3, 11.12, 11.13) as a pure state machine: feed it each Login
//! Request, send what it returns. No I/O here, so tests drive it with literal PDUs.
//!
//! Stages: security (CSG 0), operational (1), full feature (3). The initiator asks to move on
//! with the T bit and NSG; the target agrees by echoing T=1 once it has nothing left to settle
//! (CHAP not finished means T=0). A stage can be skipped (0 → 3), never revisited. Text that
//! does not fit one PDU travels with the C bit: each side answers a C=1 PDU with an empty one
//! (6.3, 11.12.2).
//!
//! Authentication: the leading request's whole text is read for InitiatorName, SessionType and
//! TargetName before any other key is answered, so the required method (the target's or
//! discovery's CHAP, or none) is known whatever the key order. No transit out of the security
//! stage, and no skip past it, happens until that method has succeeded (RFC 7143 6.3, 12).
//!
//! Target offers: in a normal session's first operational-stage answer the target offers
//! InitialR2T=No, ImmediateData=Yes and its burst lengths for whichever of them the initiator
//! has not negotiated (RFC 7143 6.2: either side may start a negotiation); the initiator's
//! answer is the result, and the full feature phase waits for every answer. A login that skips
//! the operational stage keeps the defaults.

use rand::RngCore;

use crate::pdu::{op, Bhs, Pdu};
use crate::text::{self, Answer, Params};
use crate::{chap, Auth, ServerConfig};

/// Login text larger than this is refused (bounded memory while the initiator is unknown).
const MAX_LOGIN_TEXT: usize = 64 * 1024;
/// The largest data segment either side sends during login (RFC 7143 13.12: the declared
/// MaxRecvDataSegmentLength applies only from the full feature phase on).
pub const LOGIN_MAX_DATA: u32 = 8192;

/// The longest iSCSI name, in bytes (RFC 7143 4.2.7.1).
const MAX_NAME: usize = 223;

/// Login status class and detail (RFC 7143 11.13.5).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const INITIATOR_ERROR: u16 = 0x0200;
    pub const AUTH_FAILURE: u16 = 0x0201;
    pub const AUTHORIZATION_FAILURE: u16 = 0x0202;
    pub const NOT_FOUND: u16 = 0x0203;
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    pub const MISSING_PARAMETER: u16 = 0x0207;
    pub const SESSION_TYPE_UNSUPPORTED: u16 = 0x0209;
    pub const SESSION_DOES_NOT_EXIST: u16 = 0x020a;
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    /// "The iSCSI service or target is not currently operational."
    pub const SERVICE_UNAVAILABLE: u16 = 0x0301;
}

/// What kind of session is being set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Discovery,
    /// Index into [`ServerConfig::targets`].
    Normal(usize),
}

/// A completed login.
#[derive(Debug, Clone)]
pub struct Established {
    pub kind: Kind,
    pub initiator_name: String,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub params: Params,
    /// The CmdSN the first full-feature command carries (RFC 7143 11.12.7).
    pub exp_cmdsn: u32,
    /// The StatSN of the next status-bearing PDU.
    pub next_statsn: u32,
    pub cid: u16,
}

/// What to do after sending the returned PDU.
#[derive(Debug)]
pub enum Outcome {
    /// Wait for the next Login Request.
    Continue,
    /// Close the connection (the response carries a non-zero status).
    Fail(u16),
    /// Full feature phase begins.
    Done(Box<Established>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AuthState {
    /// No AuthMethod agreed yet.
    Start,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    ChapMethod,
    /// Challenge sent; waiting for CHAP_N / CHAP_R.
    Challenged { id: u8, challenge: Vec<u8> },
    /// Authenticated (or none required).
    Done,
}

/// The login state machine of one connection.
pub struct Login<'a> {
    config: &'a ServerConfig,
    stage: u8,
    started: bool,
    isid: [u8; 6],
    tsih: u16,
    itt: u32,
    cid: u16,
    cmdsn: u32,
    statsn: u32,
    initiator_name: Option<String>,
    kind: Option<Kind>,
    auth: Auth,
    auth_state: AuthState,
    params: Params,
    declared: bool,
    text_in: Vec<u8>,
    text_out: Vec<u8>,
    new_tsih: u16,
    /// Keys already received in this login (RFC 7143 6.1: none may be sent twice).
    seen: std::collections::HashSet<String>,
    /// The stage the target agreed to move to with the last part of its pending reply.
    transit: Option<u8>,
    /// Whether the target has made its own offers (once, in the operational stage).
    offers_made: bool,
    /// Keys the target offered that the initiator has not answered yet, with the values
    /// offered.
    offered: Vec<(&'static str, String)>,
    /// The current stage of the request that completed the login (see [`Login::refuse`]).
    final_csg: u8,
}

fn login_flags(t: bool, c: bool, csg: u8, nsg: u8) -> u8 {
    (u8::from(t) << 7) | (u8::from(c) << 6) | ((csg & 3) << 2) | (nsg & 3)
}

impl<'a> Login<'a> {
    /// `tsih` is the session handle the session will get if the login succeeds (non-zero).
    pub fn new(config: &'a ServerConfig, tsih: u16) -> Self {
        Self {
            config,
            stage: 0,
            started: false,
            isid: [0; 6],
            tsih: 0,
            itt: 0,
            cid: 0,
            cmdsn: 0,
            statsn: rand::thread_rng().next_u32(),
            initiator_name: None,
            kind: None,
            auth: Auth::default(),
            auth_state: AuthState::Start,
            params: Params::default(),
            declared: false,
            text_in: Vec::new(),
            text_out: Vec::new(),
            new_tsih: tsih,
            seen: std::collections::HashSet::new(),
            transit: None,
            offers_made: false,
            offered: Vec::new(),
            final_csg: 0,
        }
    }

    fn response(&mut self, flags: u8, status: u16, data: &[u8]) -> (Bhs, Vec<u8>) {
        let mut b = Bhs::new(op::LOGIN_RESP);
        b.0[1] = flags;
        b.0[2] = 0; // Version-max
        b.0[3] = 0; // Version-active
        b.0[8..14].copy_from_slice(&self.isid);
        b.set_u16(14, self.tsih);
        b.set_u32(16, self.itt);
        b.set_u32(24, self.statsn);
        self.statsn = self.statsn.wrapping_add(1);
        b.set_u32(28, self.cmdsn);
        b.set_u32(32, self.cmdsn.wrapping_add(crate::session::QUEUE_DEPTH - 1));
        b.set_u16(36, status);
        b.set_data_len(data.len() as u32);
        (b, data.to_vec())
    }

    /// A final Login Response with the non-zero `status`, after which the connection closes.
    pub fn fail(&mut self, status: u16) -> (Bhs, Vec<u8>, Outcome) {
        let flags = login_flags(false, false, self.stage, 0);
        let (b, d) = self.response(flags, status, &[]);
        (b, d, Outcome::Fail(status))
    }

    /// A final Login Response with the non-zero `status` to the request whose header is `bhs`,
    /// which could not be taken as a Login Request: another opcode, or a data segment beyond
    /// the login phase's limit. It answers that request's ITT (and, if no request was taken
    /// before, its ISID and CmdSN), not the one before it.
    pub fn fail_request(&mut self, bhs: &Bhs, status: u16) -> (Bhs, Vec<u8>, Outcome) {
        self.itt = bhs.itt();
        if !self.started {
            self.isid.copy_from_slice(&bhs.0[8..14]);
            self.cmdsn = bhs.cmdsn();
        }
        self.fail(status)
    }

    /// Instead of the final response [`Login::step`] built for a completed login (which is not
    /// sent), a refusal with `status`: the session never came to be, so the response carries
    /// the request's stage (CSG) and TSIH (0: a login with another fails earlier) and the StatSN
    /// the success would have carried, not the new session's.
    pub fn refuse(&mut self, status: u16) -> (Bhs, Vec<u8>) {
        self.stage = self.final_csg;
        self.tsih = 0;
        self.statsn = self.statsn.wrapping_sub(1);
        let (b, d, _) = self.fail(status);
        (b, d)
    }

    /// Handle one PDU received during login.
    pub fn step(&mut self, pdu: &Pdu) -> (Bhs, Vec<u8>, Outcome) {
        let bhs = &pdu.bhs;
        if bhs.opcode() != op::LOGIN_REQ {
            return self.fail_request(bhs, status::INVALID_DURING_LOGIN);
        }
        let flags = bhs.flags();
        let t = flags & 0x80 != 0;
        let c = flags & 0x40 != 0;
        let csg = (flags >> 2) & 3;
        let nsg = flags & 3;
        let mut isid = [0; 6];
        isid.copy_from_slice(&bhs.0[8..14]);
        let tsih = bhs.u16_at(14);
        if !self.started {
            self.started = true;
            self.isid = isid;
            self.tsih = tsih;
            self.itt = bhs.itt();
            self.cid = bhs.u16_at(20);
            self.cmdsn = bhs.cmdsn();
            self.stage = csg;
            // RFC 7143 11.12.4: Version-min above what we support (0) fails the login.
            if bhs.0[3] > 0 {
                return self.fail(status::UNSUPPORTED_VERSION);
            }
            // A non-zero TSIH adds a connection to (or reinstates one of) an existing session;
            // with MaxConnections=1 and ERL 0 there is none to join.
            if tsih != 0 {
                return self.fail(status::SESSION_DOES_NOT_EXIST);
            }
        } else {
            self.itt = bhs.itt();
            if isid != self.isid || tsih != self.tsih {
                return self.fail(status::INITIATOR_ERROR);
            }
        }
        // RFC 7143 11.12.3: CSG must be the current stage, security (0) or operational (1);
        // NSG 2 is reserved; T and C together are a protocol error; a transit must go forward.
        if csg != self.stage || csg >= 2 || (t && c) || (t && (nsg == 2 || nsg <= csg)) {
            return self.fail(status::INITIATOR_ERROR);
        }
        if self.text_in.len() + pdu.data.len() > MAX_LOGIN_TEXT {
            return self.fail(status::INITIATOR_ERROR);
        }
        self.text_in.extend_from_slice(&pdu.data);
        if c {
            // More text follows: acknowledge with an empty response (RFC 7143 6.3).
            let (b, d) = self.response(login_flags(false, false, csg, 0), status::SUCCESS, &[]);
            return (b, d, Outcome::Continue);
        }
        if !self.text_out.is_empty() {
            // The initiator is fetching the rest of our text.
            return self.send_text(t, csg);
        }
        let input = std::mem::take(&mut self.text_in);
        let pairs = match text::parse(&input) {
            Ok(p) => p,
            Err(_) => return self.fail(status::INITIATOR_ERROR),
        };
        for (k, _) in &pairs {
            // RFC 7143 6.1: declaring or negotiating a key twice is an initiator error.
            if self.seen.len() > 256 || !self.seen.insert(k.clone()) {
                return self.fail(status::INITIATOR_ERROR);
            }
        }
        let mut reply: Vec<(String, String)> = Vec::new();
        // The session kind and target decide which authentication is required, so they are
        // resolved from the whole text before any other key (AuthMethod in particular) is
        // answered, whatever order the initiator put them in.
        if let Err(s) = self.resolve_session(&pairs, &mut reply) {
            return self.fail(s);
        }
        let mut chap_n = None;
        let mut chap_r = None;
        let mut chap_i = None;
        let mut chap_c = None;
        let mut auth_fail = false;
        for (k, v) in &pairs {
            match k.as_str() {
                "InitiatorName" | "SessionType" | "TargetName" | "InitiatorAlias" => {}
                "AuthMethod" if csg == 0 && self.auth_state == AuthState::Start => {
                    // RFC 7143 12: the target picks the first method it accepts from the
                    // initiator's list; only the method the target requires is accepted.
                    let want = if self.auth.chap.is_some() {
                        "CHAP"
                    } else {
                        "None"
                    };
                    let pick = v.split(',').any(|m| m == want).then_some(want);
                    match pick {
                        Some("CHAP") => self.auth_state = AuthState::ChapMethod,
                        Some(_) => self.auth_state = AuthState::Done,
                        None => auth_fail = true,
                    }
                    reply.push((k.clone(), pick.unwrap_or("Reject").to_string()));
                }
                "CHAP_A" if self.auth_state == AuthState::ChapMethod => {
                    // RFC 7143 12.1.3: only MD5 (5) is supported.
                    if v.split(',').any(|a| a == "5") {
                        let mut rng = rand::thread_rng();
                        let id = (rng.next_u32() & 0xff) as u8;
                        let mut challenge = vec![0u8; 16];
                        rng.fill_bytes(&mut challenge);
                        reply.push(("CHAP_A".into(), "5".into()));
                        reply.push(("CHAP_I".into(), id.to_string()));
                        reply.push(("CHAP_C".into(), chap::to_hex(&challenge)));
                        self.auth_state = AuthState::Challenged { id, challenge };
                    } else {
                        reply.push((k.clone(), "Reject".into()));
                        auth_fail = true;
                    }
                }
                "CHAP_N" => chap_n = Some(v.clone()),
                "CHAP_R" => chap_r = Some(v.clone()),
                "CHAP_I" => chap_i = Some(v.clone()),
                "CHAP_C" => chap_c = Some(v.clone()),
                "AuthMethod" | "CHAP_A" => auth_fail = true,
                "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" | "SendTargets" => {
                    reply.push((k.clone(), "Irrelevant".into()))
                }
                _ => match self.offered.iter().position(|(o, _)| o == k) {
                    // The initiator's answer to our offer: the result, not answered again.
                    Some(at) => {
                        let (_, ours) = self.offered.remove(at);
                        if text::apply_answer(&mut self.params, k, v, &ours).is_err() {
                            return self.fail(status::INITIATOR_ERROR);
                        }
                    }
                    None => {
                        let discovery = self.kind == Some(Kind::Discovery);
                        match text::negotiate(&mut self.params, k, v, discovery) {
                            Answer::Value(a) => reply.push((k.clone(), a)),
                            Answer::Silent => {}
                            Answer::NotOperational => {
                                reply.push((k.clone(), "NotUnderstood".into()))
                            }
                        }
                    }
                },
            }
        }
        if auth_fail {
            return self.fail(status::AUTH_FAILURE);
        }
        if let (Some(n), Some(r)) = (&chap_n, &chap_r) {
            match self.verify_chap(n, r, chap_i.as_deref(), chap_c.as_deref()) {
                Ok(mutual) => reply.extend(mutual),
                Err(s) => return self.fail(s),
            }
        } else if chap_n.is_some() || chap_r.is_some() {
            return self.fail(status::AUTH_FAILURE);
        }
        // RFC 7143 6.3, 12: the security stage is left (or skipped, by starting in the
        // operational stage or by a transit from 0 straight to 3) only once the agreed
        // method satisfies what the target or discovery requires.
        if !self.authenticated() {
            if csg != 0 {
                return self.fail(status::AUTH_FAILURE);
            }
            // Asking to leave without ever proposing an AuthMethod while the target requires
            // one: refused now, not left to repeat until the login times out.
            if t && matches!(self.auth_state, AuthState::Start) && self.kind.is_some() {
                return self.fail(status::AUTH_FAILURE);
            }
            if t {
                // Still negotiating: stay in the security stage (T=0 in the answer).
                return self.finish_step(reply, false, csg, nsg);
            }
        }
        // Declare MaxRecvDataSegmentLength in the operational stage only: it is an
        // operational key, and RFC 7143 13 allows only the Any-Stage keys in the security
        // stage (open-iscsi fails a login whose security-stage answer carries another). A
        // login that skips the operational stage keeps the 8192-byte default on both sides.
        if csg == 1 {
            self.declare(&mut reply);
            self.offer(&mut reply);
        }
        // RFC 7143 6.2, 6.3: a negotiation ends with its answer, so the full feature phase
        // waits until the initiator has answered every offer of ours (T=0 meanwhile).
        let t = t && (nsg != 3 || self.offered.is_empty());
        self.finish_step(reply, t, csg, nsg)
    }

    /// In a normal session's first operational-stage answer, offer the keys the initiator has
    /// not negotiated (see [`text::target_offers`]). A login that skips the operational stage
    /// keeps their defaults.
    fn offer(&mut self, reply: &mut Vec<(String, String)>) {
        if self.offers_made || !matches!(self.kind, Some(Kind::Normal(_))) {
            return;
        }
        self.offers_made = true;
        for (k, v) in text::target_offers(&self.params) {
            if !self.seen.contains(k) {
                reply.push((k.to_string(), v.clone()));
                self.offered.push((k, v));
            }
        }
    }

    /// Whether the login may leave the security stage: the required authentication is done,
    /// or none is required and no CHAP exchange is half-way.
    fn authenticated(&self) -> bool {
        match &self.auth_state {
            AuthState::Done => true,
            AuthState::Start => self.kind.is_some() && self.auth.chap.is_none(),
            AuthState::ChapMethod | AuthState::Challenged { .. } => false,
        }
    }

    /// Settle the session kind, the target, its ACL and its authentication from the leading
    /// Login Request's text (RFC 7143 13.4-13.6: InitiatorName and, for a normal session,
    /// TargetName come in the first Login Request; SessionType defaults to Normal). Later
    /// requests may not change them.
    fn resolve_session(
        &mut self,
        pairs: &[(String, String)],
        reply: &mut Vec<(String, String)>,
    ) -> Result<(), u16> {
        let value = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let session_type = value("SessionType");
        let target_name = value("TargetName");
        let initiator_name = value("InitiatorName");
        if let Some(kind) = self.kind {
            let same_type = matches!(
                (session_type, kind),
                (None, _)
                    | (Some("Discovery"), Kind::Discovery)
                    | (Some("Normal"), Kind::Normal(_))
            );
            if !same_type || target_name.is_some() || initiator_name.is_some() {
                return Err(status::INITIATOR_ERROR);
            }
            return Ok(());
        }
        let Some(name) = initiator_name else {
            return Err(status::MISSING_PARAMETER);
        };
        // iSCSI names are compared as the stringprep profile of RFC 3722 leaves them: case
        // folded (its mapping table B.2), as the configuration holds them. A name sent with
        // capitals is the same initiator, and the same nexus, as its lower-case form.
        let name = &name.to_lowercase();
        // An iSCSI name is 1 to 223 bytes (RFC 7143 4.2.7.1), folded; it becomes the I_T
        // nexus's identity and the TransportID that persistent reservations store.
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(status::INITIATOR_ERROR);
        }
        // Of ASCII, an iSCSI name holds only letters, digits, '-', '.' and ':' (RFC 3720
        // 3.2.6.2). A comma would make the name's TransportID (`name,i,0x<ISID>`, SPC-5
        // 7.6.4.6) ambiguous, and a space or control character (any, in Unicode) its log
        // lines; such a name is refused. Other ASCII punctuation is let through: some
        // initiators are configured with names that hold it (an underscore), and it breaks
        // nothing here.
        if name
            .chars()
            .any(|ch| ch == ',' || ch.is_whitespace() || ch.is_control())
        {
            return Err(status::INITIATOR_ERROR);
        }
        match session_type.unwrap_or("Normal") {
            "Discovery" => {
                self.kind = Some(Kind::Discovery);
                self.auth = self.config.discovery_auth.clone();
            }
            "Normal" => {
                let tn = target_name.ok_or(status::MISSING_PARAMETER)?;
                let (i, tc) = self
                    .config
                    .targets
                    .iter()
                    .enumerate()
                    .find(|(_, t)| t.name == tn.to_lowercase())
                    .ok_or(status::NOT_FOUND)?;
                if let Some(acl) = &tc.allowed_initiators {
                    if !acl.iter().any(|a| a == name) {
                        return Err(status::AUTHORIZATION_FAILURE);
                    }
                }
                self.kind = Some(Kind::Normal(i));
                self.auth = tc.auth.clone();
                // RFC 7143 13.9: TargetPortalGroupTag in the first response of a normal
                // session.
                reply.push(("TargetPortalGroupTag".into(), tc.tpgt.to_string()));
                if let Some(a) = &tc.alias {
                    reply.push(("TargetAlias".into(), a.clone()));
                }
            }
            _ => return Err(status::SESSION_TYPE_UNSUPPORTED),
        }
        self.initiator_name = Some(name.to_string());
        Ok(())
    }

    fn declare(&mut self, reply: &mut Vec<(String, String)>) {
        if !self.declared {
            self.declared = true;
            reply.push((
                "MaxRecvDataSegmentLength".into(),
                self.params.max_recv_dsl.to_string(),
            ));
        }
    }

    fn verify_chap(
        &mut self,
        n: &str,
        r: &str,
        i: Option<&str>,
        c: Option<&str>,
    ) -> Result<Vec<(String, String)>, u16> {
        let AuthState::Challenged { id, challenge } = &self.auth_state else {
            return Err(status::AUTH_FAILURE);
        };
        let Some(secret) = &self.auth.chap else {
            return Err(status::AUTH_FAILURE);
        };
        let got = chap::decode_binary(r).ok_or(status::AUTH_FAILURE)?;
        let want = chap::response(*id, secret.secret.as_bytes(), challenge);
        if n != secret.user || !chap::equal(&got, &want) {
            return Err(status::AUTH_FAILURE);
        }
        let mut reply = Vec::new();
        match (i, c, &self.auth.mutual) {
            (None, None, None) => {}
            (Some(i), Some(c), Some(m)) => {
                let id: u8 = text::parse_number(i)
                    .and_then(|x| u8::try_from(x).ok())
                    .ok_or(status::AUTH_FAILURE)?;
                let ic = chap::decode_binary(c).ok_or(status::AUTH_FAILURE)?;
                // RFC 7143 12.1.3: a target receiving its own challenge back must fail the
                // login (reflection attack); an empty or huge challenge is refused too.
                if ic.is_empty() || ic.len() > 1024 || chap::equal(&ic, challenge) {
                    return Err(status::AUTH_FAILURE);
                }
                let resp = chap::response(id, m.secret.as_bytes(), &ic);
                reply.push(("CHAP_N".into(), m.user.clone()));
                reply.push(("CHAP_R".into(), chap::to_hex(&resp)));
            }
            // Mutual CHAP asked for but not configured, or configured but not asked for.
            _ => return Err(status::AUTH_FAILURE),
        }
        self.auth_state = AuthState::Done;
        Ok(reply)
    }

    /// Answer the current request with `reply`; `t` is whether the target agrees to the
    /// transit to `nsg`. The decision is kept for the rest of the reply should it need more
    /// than one PDU.
    fn finish_step(
        &mut self,
        reply: Vec<(String, String)>,
        t: bool,
        csg: u8,
        nsg: u8,
    ) -> (Bhs, Vec<u8>, Outcome) {
        self.text_out = text::encode(&reply);
        self.transit = t.then_some(nsg);
        self.send_text(t, csg)
    }

    /// Send the next part of the pending reply. `t` is the current request's T bit: the
    /// transit happens with the last part, when both sides still ask for it (RFC 7143 6.3).
    fn send_text(&mut self, t: bool, csg: u8) -> (Bhs, Vec<u8>, Outcome) {
        let max = LOGIN_MAX_DATA as usize;
        let rest = if self.text_out.len() > max {
            self.text_out.split_off(max)
        } else {
            Vec::new()
        };
        let chunk = std::mem::replace(&mut self.text_out, rest);
        let more = !self.text_out.is_empty();
        if more {
            // RFC 7143 11.13.2: C=1 and T=0 while text is pending.
            let (b, d) = self.response(login_flags(false, true, csg, 0), 0, &chunk);
            return (b, d, Outcome::Continue);
        }
        // Never leave a stage unauthenticated, whatever path led here (RFC 7143 12).
        let transit = match self.transit.take() {
            Some(nsg) if t && self.authenticated() => Some(nsg),
            _ => None,
        };
        match (transit, self.kind) {
            (Some(3), Some(kind)) => {
                self.final_csg = csg;
                self.stage = 3;
                self.tsih = self.new_tsih;
                if !self.declared {
                    // The operational stage was skipped: the initiator holds the target to
                    // the default (RFC 7143 13.12), and so does the target itself.
                    self.params.max_recv_dsl = 8192;
                }
                self.params.finish();
                let (b, d) = self.response(login_flags(true, false, csg, 3), 0, &chunk);
                let est = Established {
                    kind,
                    initiator_name: self.initiator_name.clone().unwrap_or_default(),
                    isid: self.isid,
                    tsih: self.tsih,
                    params: self.params.clone(),
                    exp_cmdsn: self.cmdsn,
                    next_statsn: self.statsn,
                    cid: self.cid,
                };
                (b, d, Outcome::Done(Box::new(est)))
            }
            (Some(nsg), Some(_)) if nsg != 3 => {
                self.stage = nsg;
                let (b, d) = self.response(login_flags(true, false, csg, nsg), 0, &chunk);
                (b, d, Outcome::Continue)
            }
            _ => {
                let (b, d) = self.response(login_flags(false, false, csg, 0), 0, &chunk);
                (b, d, Outcome::Continue)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChapSecret, TargetConfig};
    use std::sync::Arc;

    const TARGET: &str = "iqn.2026-01.io.sharedisk:t";
    /// The keys the target offers when the initiator leaves them out.
    const ALL_FOUR: &str =
        "InitialR2T=Yes|ImmediateData=Yes|MaxBurstLength=262144|FirstBurstLength=65536|";

    fn config(auth: Auth, acl: Option<Vec<String>>) -> ServerConfig {
        ServerConfig {
            targets: vec![TargetConfig {
                name: TARGET.into(),
                alias: None,
                scsi: Arc::new(scsi::Target::new()),
                allowed_initiators: acl,
                auth,
                tpgt: 1,
            }],
            discovery_auth: Auth::default(),
            portals: vec![],
        }
    }

    /// A Login Request (RFC 7143 11.12) with the given flags and text.
    fn req(flags: u8, text: &str) -> Pdu {
        let mut b = [0u8; 48];
        b[0] = 0x43; // I=1, opcode Login Request
        b[1] = flags; // T C . . CSG NSG
        b[2] = 0x00; // Version-max
        b[3] = 0x00; // Version-min
        b[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]); // ISID (random type)
        b[14..16].copy_from_slice(&[0, 0]); // TSIH 0: a new session
        b[16..20].copy_from_slice(&[0, 0, 0, 1]); // ITT
        b[20..22].copy_from_slice(&[0, 1]); // CID
        b[24..28].copy_from_slice(&[0, 0, 0, 10]); // CmdSN
        let data: Vec<u8> = text.replace('|', "\0").into_bytes();
        Pdu {
            bhs: Bhs(b),
            ahs: vec![],
            data,
            data_digest_bad: false,
        }
    }

    fn reply_text(d: &[u8]) -> Vec<(String, String)> {
        text::parse(d).expect("valid reply text")
    }

    fn get<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
        pairs
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
    }

    /// RFC 7143 13: in the security stage only the Any-Stage keys (TargetAlias,
    /// TargetAddress, TargetPortalGroupTag; InitiatorName and friends are the initiator's)
    /// and the authentication keys (AuthMethod, CHAP_A/I/C/N/R) may appear.
    fn assert_security_stage_keys_only(pairs: &[(String, String)]) {
        for (k, _) in pairs {
            assert!(
                matches!(
                    k.as_str(),
                    "TargetAlias"
                        | "TargetAddress"
                        | "TargetPortalGroupTag"
                        | "AuthMethod"
                        | "CHAP_A"
                        | "CHAP_I"
                        | "CHAP_C"
                        | "CHAP_N"
                        | "CHAP_R"
                ),
                "{k} in a security-stage answer: {pairs:?}"
            );
        }
    }

    #[test]
    fn security_then_operational_then_full_feature() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 7);
        // T=1 CSG=0 NSG=1
        let (b, d, o) = l.step(&req(
            0x81,
            &format!("InitiatorName=iqn.i|TargetName={TARGET}|SessionType=Normal|AuthMethod=None|"),
        ));
        assert!(matches!(o, Outcome::Continue));
        assert_eq!(b.0[0], 0x23);
        assert_eq!(b.0[1], 0x81); // T=1 CSG=0 NSG=1
        assert_eq!(b.u16_at(36), 0);
        let r = reply_text(&d);
        assert_eq!(get(&r, "AuthMethod"), Some("None"));
        assert_eq!(get(&r, "TargetPortalGroupTag"), Some("1"));
        // RFC 7143 13: only Any-Stage keys (TargetAlias, TargetAddress,
        // TargetPortalGroupTag) and the security keys may appear in the security stage, so
        // the operational key MaxRecvDataSegmentLength waits for the operational stage.
        assert_eq!(get(&r, "MaxRecvDataSegmentLength"), None);
        // T=1 CSG=1 NSG=3
        let (b, d, o) = l.step(&req(
            0x87,
            "HeaderDigest=None|MaxRecvDataSegmentLength=65536|ImmediateData=Yes|InitialR2T=No|\
             MaxBurstLength=262144|FirstBurstLength=65536|Foo=1|",
        ));
        assert_eq!(b.0[1], 0x87);
        assert_eq!(b.u16_at(14), 7); // TSIH assigned
        assert_eq!(b.u32_at(28), 10); // ExpCmdSN = the login's CmdSN
        let r = reply_text(&d);
        assert_eq!(get(&r, "Foo"), Some("NotUnderstood"));
        assert_eq!(get(&r, "InitialR2T"), Some("No"));
        // Declared in the operational stage: the target's receive limit.
        assert_eq!(get(&r, "MaxRecvDataSegmentLength"), Some("262144"));
        let Outcome::Done(est) = o else {
            panic!("login should complete")
        };
        assert_eq!(est.params.max_send_dsl, 65536);
        assert!(!est.params.initial_r2t);
        assert_eq!(est.kind, Kind::Normal(0));
    }

    #[test]
    fn missing_initiator_name_is_0207() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 1);
        let (b, _, o) = l.step(&req(0x87, &format!("TargetName={TARGET}|")));
        assert!(matches!(o, Outcome::Fail(0x0207)));
        assert_eq!(b.0[36], 0x02); // Status-Class: initiator error
        assert_eq!(b.0[37], 0x07); // Status-Detail: missing parameter
    }

    #[test]
    fn unknown_target_is_0203() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 1);
        let (_, _, o) = l.step(&req(0x87, "InitiatorName=iqn.i|TargetName=iqn.nope|"));
        assert!(matches!(o, Outcome::Fail(0x0203)));
    }

    /// Log in as initiator `name`: refused with status 0200h (initiator error, miscellaneous)
    /// if `fails`, not refused otherwise.
    fn assert_initiator_name(cfg: &ServerConfig, name: &str, fails: bool) {
        let mut l = Login::new(cfg, 1);
        let (b, _, o) = l.step(&req(
            0x87,
            &format!("InitiatorName={name}|TargetName={TARGET}|"),
        ));
        if fails {
            assert!(
                matches!(o, Outcome::Fail(0x0200)),
                "{name:?} ({} bytes)",
                name.len()
            );
            assert_eq!((b.0[36], b.0[37]), (0x02, 0x00));
        } else {
            assert!(!matches!(o, Outcome::Fail(_)), "{name:?} is a name");
        }
    }

    #[test]
    fn initiator_names_longer_than_223_bytes_or_empty_are_initiator_errors() {
        // RFC 7143 4.2.7.1: an iSCSI name is at most 223 bytes. Status 0200h: Status-Class 2
        // (initiator error), Status-Detail 0 (miscellaneous).
        let cfg = config(Auth::default(), None);
        let longest = format!("iqn.2026-01.test:{}", "x".repeat(223 - 17));
        assert_eq!(longest.len(), 223);
        for (name, fails) in [
            (String::new(), true),
            (format!("{longest}x"), true),
            (longest.clone(), false),
        ] {
            assert_initiator_name(&cfg, &name, fails);
        }
    }

    #[test]
    fn initiator_names_with_a_comma_a_space_or_a_control_character_are_initiator_errors() {
        // RFC 3720 3.2.6.2: of ASCII, a name holds letters, digits, '-', '.' and ':'. A comma
        // would make the TransportID "name,i,0x<ISID>" (SPC-5 7.6.4.6) ambiguous. Status
        // 0200h: initiator error, miscellaneous.
        let cfg = config(Auth::default(), None);
        for (name, fails) in [
            ("iqn.2026-01.test:a,i,0x800000000001", true),
            ("iqn.2026-01.test:a b", true),
            ("iqn.2026-01.test:a\tb", true),
            ("iqn.2026-01.test:a\u{a0}b", true), // NO-BREAK SPACE
            ("iqn.2026-01.test:a\u{85}b", true), // NEXT LINE (C1 control)
            ("iqn.2026-01.test:host_1", false),
            ("iqn.2026-01.test:h\u{f6}st", false),
        ] {
            assert_initiator_name(&cfg, name, fails);
        }
    }

    #[test]
    fn initiator_not_in_acl_is_0202() {
        let cfg = config(Auth::default(), Some(vec!["iqn.allowed".into()]));
        let mut l = Login::new(&cfg, 1);
        let (_, _, o) = l.step(&req(
            0x87,
            &format!("InitiatorName=iqn.other|TargetName={TARGET}|"),
        ));
        assert!(matches!(o, Outcome::Fail(0x0202)));
    }

    #[test]
    fn backward_transit_is_an_initiator_error() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 1);
        // T=1 CSG=1 NSG=0
        let (_, _, o) = l.step(&req(
            0x84,
            &format!("InitiatorName=iqn.i|TargetName={TARGET}|"),
        ));
        assert!(matches!(o, Outcome::Fail(0x0200)));
    }

    #[test]
    fn key_sent_twice_is_an_initiator_error() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 1);
        let (_, _, o) = l.step(&req(
            0x01,
            &format!("InitiatorName=iqn.i|TargetName={TARGET}|MaxBurstLength=512|"),
        ));
        assert!(matches!(o, Outcome::Continue));
        let (_, _, o) = l.step(&req(0x05, "MaxBurstLength=1024|"));
        assert!(matches!(o, Outcome::Fail(0x0200)));
    }

    #[test]
    fn unsupported_version_is_0205() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 1);
        let mut p = req(0x87, "InitiatorName=iqn.i|SessionType=Discovery|");
        p.bhs.0[3] = 1; // Version-min 1
        let (_, _, o) = l.step(&p);
        assert!(matches!(o, Outcome::Fail(0x0205)));
    }

    #[test]
    fn discovery_session_skips_target_name() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 1);
        let (_, d, o) = l.step(&req(
            0x87,
            "InitiatorName=iqn.i|SessionType=Discovery|MaxBurstLength=8192|",
        ));
        let Outcome::Done(est) = o else {
            panic!("discovery login should complete")
        };
        assert_eq!(est.kind, Kind::Discovery);
        assert_eq!(get(&reply_text(&d), "MaxBurstLength"), Some("Irrelevant"));
    }

    #[test]
    fn continued_text_is_acknowledged_with_an_empty_response() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 1);
        // C=1, CSG=1: the first half of the text.
        let (b, d, o) = l.step(&req(0x44, "InitiatorName=iq"));
        assert!(matches!(o, Outcome::Continue));
        assert!(d.is_empty());
        assert_eq!(b.0[1] & 0xc0, 0); // T=0 C=0
        let (_, _, o) = l.step(&req(0x87, &format!("n.i|TargetName={TARGET}|{ALL_FOUR}")));
        let Outcome::Done(est) = o else {
            panic!("login should complete")
        };
        assert_eq!(est.initiator_name, "iqn.i");
    }

    fn chap_config(mutual: bool) -> ServerConfig {
        config(
            Auth {
                chap: Some(ChapSecret {
                    user: "user".into(),
                    secret: "secretsecret".into(),
                }),
                mutual: mutual.then(|| ChapSecret {
                    user: "target".into(),
                    secret: "targetsecret".into(),
                }),
            },
            None,
        )
    }

    fn chap_challenge(l: &mut Login) -> (u8, Vec<u8>) {
        let (_, d, _) = l.step(&req(
            0x01,
            &format!("InitiatorName=iqn.i|TargetName={TARGET}|AuthMethod=CHAP,None|"),
        ));
        assert_security_stage_keys_only(&reply_text(&d));
        assert_eq!(get(&reply_text(&d), "AuthMethod"), Some("CHAP"));
        let (b, d, _) = l.step(&req(0x01, "CHAP_A=7,5|"));
        assert_eq!(b.0[1] & 0x80, 0);
        let r = reply_text(&d);
        assert_security_stage_keys_only(&r);
        assert_eq!(get(&r, "CHAP_A"), Some("5"));
        let id: u8 = get(&r, "CHAP_I")
            .and_then(|v| v.parse().ok())
            .expect("CHAP_I");
        let c = chap::decode_binary(get(&r, "CHAP_C").expect("CHAP_C")).expect("hex");
        (id, c)
    }

    #[test]
    fn one_way_chap_accepts_the_right_response() {
        let cfg = chap_config(false);
        let mut l = Login::new(&cfg, 1);
        let (id, c) = chap_challenge(&mut l);
        let r = chap::to_hex(&chap::response(id, b"secretsecret", &c));
        let (b, d, o) = l.step(&req(0x81, &format!("CHAP_N=user|CHAP_R={r}|")));
        assert!(matches!(o, Outcome::Continue));
        assert_eq!(b.0[1], 0x81); // transit to the operational stage
        assert_security_stage_keys_only(&reply_text(&d));
        // T=1 CSG=1 NSG=3: the operational stage's answer declares the target's limit (and
        // makes the target's offers, so the login goes on).
        let (b, d, o) = l.step(&req(0x87, "HeaderDigest=None|"));
        assert!(matches!(o, Outcome::Continue), "{o:?}");
        assert_eq!(b.0[1] & 0x0C, 0x04, "CSG=1");
        assert_eq!(
            get(&reply_text(&d), "MaxRecvDataSegmentLength"),
            Some("262144")
        );
    }

    #[test]
    fn one_way_chap_rejects_a_wrong_response() {
        let cfg = chap_config(false);
        let mut l = Login::new(&cfg, 1);
        let (id, c) = chap_challenge(&mut l);
        let r = chap::to_hex(&chap::response(id, b"wrong", &c));
        let (_, _, o) = l.step(&req(0x81, &format!("CHAP_N=user|CHAP_R={r}|")));
        assert!(matches!(o, Outcome::Fail(0x0201)));
    }

    #[test]
    fn mutual_chap_answers_the_initiator_challenge() {
        let cfg = chap_config(true);
        let mut l = Login::new(&cfg, 1);
        let (id, c) = chap_challenge(&mut l);
        let r = chap::to_hex(&chap::response(id, b"secretsecret", &c));
        let (_, d, o) = l.step(&req(
            0x81,
            &format!("CHAP_N=user|CHAP_R={r}|CHAP_I=9|CHAP_C=0b AAECAw==|").replace(' ', ""),
        ));
        assert!(matches!(o, Outcome::Continue));
        let rr = reply_text(&d);
        assert_security_stage_keys_only(&rr);
        assert_eq!(get(&rr, "CHAP_N"), Some("target"));
        let want = chap::to_hex(&chap::response(9, b"targetsecret", &[0, 1, 2, 3]));
        assert_eq!(get(&rr, "CHAP_R"), Some(want.as_str()));
    }

    #[test]
    fn chap_required_but_skipped_fails() {
        let cfg = chap_config(false);
        let mut l = Login::new(&cfg, 1);
        let (_, _, o) = l.step(&req(
            0x87,
            &format!("InitiatorName=iqn.i|TargetName={TARGET}|"),
        ));
        assert!(matches!(o, Outcome::Fail(0x0201)));
    }

    /// A server whose discovery sessions need CHAP.
    fn discovery_chap_config() -> ServerConfig {
        let mut cfg = config(Auth::default(), None);
        cfg.discovery_auth = Auth {
            chap: Some(ChapSecret {
                user: "user".into(),
                secret: "secretsecret".into(),
            }),
            mutual: None,
        };
        cfg
    }

    /// The same keys in every order the bypass could use.
    fn orders(keys: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        let n = keys.len();
        let mut idx: Vec<usize> = (0..n).collect();
        // All permutations (Heap's algorithm); at most 4 keys here.
        let mut c = vec![0usize; n];
        out.push(idx.iter().map(|&i| format!("{}|", keys[i])).collect());
        let mut i = 0;
        while i < n {
            if c[i] < i {
                if i % 2 == 0 {
                    idx.swap(0, i);
                } else {
                    idx.swap(c[i], i);
                }
                out.push(idx.iter().map(|&i| format!("{}|", keys[i])).collect());
                c[i] += 1;
                i = 0;
            } else {
                c[i] = 0;
                i += 1;
            }
        }
        out
    }

    #[test]
    fn auth_method_none_for_a_chap_target_fails_in_any_key_order() {
        let cfg = chap_config(false);
        let target = format!("TargetName={TARGET}");
        let keys = ["InitiatorName=iqn.i", "AuthMethod=None", target.as_str()];
        for text in orders(&keys) {
            // T=1 CSG=0 NSG=3: skip the operational stage straight to full feature phase.
            for flags in [0x83, 0x81] {
                let mut l = Login::new(&cfg, 1);
                let (b, d, o) = l.step(&req(flags, &text));
                assert!(matches!(o, Outcome::Fail(0x0201)), "{text}: {o:?}");
                assert_eq!(b.0[36], 0x02, "{text}: Status-Class initiator error");
                assert_eq!(
                    b.0[37], 0x01,
                    "{text}: Status-Detail authentication failure"
                );
                assert!(d.is_empty());
            }
        }
    }

    /// A CHAP target's security stage left (T=1) without an AuthMethod ever proposed: 0201h
    /// (Status-Class 2 initiator error, Status-Detail 1 authentication failure) at once.
    #[test]
    fn leaving_a_chap_target_s_security_stage_without_an_auth_method_fails() {
        let cfg = chap_config(false);
        for flags in [0x81, 0x83] {
            let mut l = Login::new(&cfg, 1);
            let (b, _, o) = l.step(&req(
                flags,
                &format!("InitiatorName=iqn.i|TargetName={TARGET}|"),
            ));
            assert!(matches!(o, Outcome::Fail(0x0201)), "{o:?}");
            assert_eq!((b.0[36], b.0[37]), (0x02, 0x01));
        }
        // Without T, the target waits for the negotiation to start.
        let mut l = Login::new(&cfg, 1);
        let (_, _, o) = l.step(&req(
            0x01,
            &format!("InitiatorName=iqn.i|TargetName={TARGET}|"),
        ));
        assert!(matches!(o, Outcome::Continue), "{o:?}");
    }

    #[test]
    fn chap_target_stays_in_the_security_stage_until_chap_is_done_in_any_key_order() {
        let cfg = chap_config(false);
        let target = format!("TargetName={TARGET}");
        let keys = [
            "InitiatorName=iqn.i",
            "AuthMethod=None,CHAP",
            "SessionType=Normal",
            target.as_str(),
        ];
        for text in orders(&keys) {
            let mut l = Login::new(&cfg, 1);
            // T=1 CSG=0 NSG=3.
            let (b, d, o) = l.step(&req(0x83, &text));
            assert!(matches!(o, Outcome::Continue), "{text}: {o:?}");
            assert_eq!(b.0[1], 0x00, "{text}: T=0 CSG=0: no transit");
            assert_eq!(b.u16_at(36), 0);
            assert_eq!(get(&reply_text(&d), "AuthMethod"), Some("CHAP"), "{text}");
            // Asking again without CHAP still does not leave the stage.
            let (b, _, o) = l.step(&req(0x83, "CHAP_A=5|"));
            assert!(matches!(o, Outcome::Continue), "{text}: {o:?}");
            assert_eq!(b.0[1], 0x00, "{text}: challenged, not authenticated");
            // Nor does starting the operational stage.
            let (_, _, o) = l.step(&req(0x87, ""));
            assert!(matches!(o, Outcome::Fail(0x0200)), "{text}: {o:?}");
        }
    }

    #[test]
    fn open_target_skips_to_full_feature_phase_in_any_key_order() {
        let cfg = config(Auth::default(), None);
        let target = format!("TargetName={TARGET}");
        let keys = ["InitiatorName=iqn.i", "AuthMethod=None", target.as_str()];
        for text in orders(&keys) {
            let mut l = Login::new(&cfg, 1);
            let (b, d, o) = l.step(&req(0x83, &text));
            assert!(matches!(o, Outcome::Done(_)), "{text}: {o:?}");
            assert_eq!(b.0[1], 0x83, "{text}: T=1 CSG=0 NSG=3");
            assert_eq!(get(&reply_text(&d), "AuthMethod"), Some("None"));
        }
    }

    #[test]
    fn open_target_refuses_chap_only() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 1);
        let (_, d, o) = l.step(&req(
            0x83,
            &format!("AuthMethod=CHAP|InitiatorName=iqn.i|TargetName={TARGET}|"),
        ));
        assert!(matches!(o, Outcome::Fail(0x0201)), "{o:?}");
        assert!(d.is_empty());
    }

    #[test]
    fn discovery_with_chap_refuses_auth_method_none_in_any_key_order() {
        let cfg = discovery_chap_config();
        let keys = [
            "InitiatorName=iqn.i",
            "AuthMethod=None",
            "SessionType=Discovery",
        ];
        for text in orders(&keys) {
            let mut l = Login::new(&cfg, 1);
            let (_, _, o) = l.step(&req(0x83, &text));
            assert!(matches!(o, Outcome::Fail(0x0201)), "{text}: {o:?}");
        }
        // Skipping the security stage altogether (CSG=1) fails too.
        let mut l = Login::new(&cfg, 1);
        let (_, _, o) = l.step(&req(0x87, "InitiatorName=iqn.i|SessionType=Discovery|"));
        assert!(matches!(o, Outcome::Fail(0x0201)), "{o:?}");
    }

    #[test]
    fn discovery_with_chap_picks_chap_in_any_key_order() {
        let cfg = discovery_chap_config();
        let keys = [
            "InitiatorName=iqn.i",
            "AuthMethod=None,CHAP",
            "SessionType=Discovery",
        ];
        for text in orders(&keys) {
            let mut l = Login::new(&cfg, 1);
            let (b, d, o) = l.step(&req(0x83, &text));
            assert!(matches!(o, Outcome::Continue), "{text}: {o:?}");
            assert_eq!(b.0[1], 0x00, "{text}: no transit");
            assert_eq!(get(&reply_text(&d), "AuthMethod"), Some("CHAP"));
        }
    }

    #[test]
    fn discovery_without_chap_skips_to_full_feature_phase_in_any_key_order() {
        let cfg = config(Auth::default(), None);
        let keys = [
            "InitiatorName=iqn.i",
            "AuthMethod=None",
            "SessionType=Discovery",
        ];
        for text in orders(&keys) {
            let mut l = Login::new(&cfg, 1);
            let (_, _, o) = l.step(&req(0x83, &text));
            let Outcome::Done(est) = o else {
                panic!("{text}: discovery login should complete")
            };
            assert_eq!(est.kind, Kind::Discovery);
        }
    }

    #[test]
    fn one_way_chap_then_skip_to_full_feature_phase() {
        let cfg = chap_config(false);
        let mut l = Login::new(&cfg, 1);
        let (id, c) = chap_challenge(&mut l);
        let r = chap::to_hex(&chap::response(id, b"secretsecret", &c));
        // T=1 CSG=0 NSG=3 with the right response.
        let (b, d, o) = l.step(&req(0x83, &format!("CHAP_N=user|CHAP_R={r}|")));
        assert!(matches!(o, Outcome::Done(_)), "{o:?}");
        assert_eq!(b.0[1], 0x83);
        // No operational stage: both sides keep MaxRecvDataSegmentLength's default.
        assert_security_stage_keys_only(&reply_text(&d));
        let Outcome::Done(est) = o else {
            unreachable!()
        };
        assert_eq!(est.params.max_send_dsl, 8192);
        assert_eq!(est.params.max_recv_dsl, 8192);
    }

    #[test]
    fn acl_uses_the_target_named_anywhere_in_the_text() {
        let mut cfg = config(Auth::default(), None);
        let mut restricted = cfg.targets[0].clone();
        restricted.name = "iqn.2026-01.io.sharedisk:restricted".into();
        restricted.allowed_initiators = Some(vec!["iqn.allowed".into()]);
        cfg.targets.push(restricted);
        let mut l = Login::new(&cfg, 1);
        let (_, _, o) = l.step(&req(
            0x83,
            "AuthMethod=None|InitiatorName=iqn.other|TargetName=iqn.2026-01.io.sharedisk:restricted|",
        ));
        assert!(matches!(o, Outcome::Fail(0x0202)), "{o:?}");
    }

    /// RFC 3722: iSCSI names are case folded before they are compared, so an initiator and
    /// a target named with capitals match the lower-case names of the configuration.
    #[test]
    fn names_sent_with_capitals_match_their_lower_case_form() {
        let cfg = config(
            Auth::default(),
            Some(vec!["iqn.2026-01.com.example:host1".into()]),
        );
        let mut l = Login::new(&cfg, 1);
        let text = format!(
            "InitiatorName=iqn.2026-01.com.Example:Host1|TargetName=IQN.2026-01.io.sharedisk:T|\
             {ALL_FOUR}"
        );
        // T=1, CSG 1 (operational), NSG 3 (full feature).
        let (b, _, o) = l.step(&req(0x87, &text));
        assert_eq!(b.0[36..38], [0, 0], "Status-Class/Detail: success");
        let Outcome::Done(est) = o else {
            panic!("{o:?}")
        };
        assert_eq!(est.initiator_name, "iqn.2026-01.com.example:host1");
    }

    #[test]
    fn a_long_reply_keeps_the_target_s_no_transit_decision() {
        // The reply to an unfinished CHAP negotiation is long enough to need the C bit; asking
        // for its rest with T=1 must not move the login on.
        let cfg = chap_config(false);
        let mut l = Login::new(&cfg, 1);
        let mut text = format!("InitiatorName=iqn.i|TargetName={TARGET}|AuthMethod=CHAP|");
        for i in 0..200 {
            text.push_str(&format!("X-com.example.Padding.Key.Number.{i:04}=1|"));
        }
        let (b, _, o) = l.step(&req(0x83, &text));
        assert!(matches!(o, Outcome::Continue));
        assert_eq!(b.0[1], 0x40, "C=1 T=0: more text follows");
        loop {
            let (b, _, o) = l.step(&req(0x83, ""));
            assert!(matches!(o, Outcome::Continue), "{o:?}");
            assert_eq!(b.0[1] & 0x80, 0, "never T=1");
            if b.0[1] & 0x40 == 0 {
                break;
            }
        }
    }

    #[test]
    fn session_keys_after_the_first_request_are_an_initiator_error() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 1);
        let (_, _, o) = l.step(&req(
            0x00,
            &format!("InitiatorName=iqn.i|TargetName={TARGET}|"),
        ));
        assert!(matches!(o, Outcome::Continue));
        let (_, _, o) = l.step(&req(0x83, "SessionType=Discovery|"));
        assert!(matches!(o, Outcome::Fail(0x0200)), "{o:?}");
    }

    #[test]
    fn target_offers_the_keys_the_initiator_left_out_and_waits_for_the_answers() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 5);
        // T=1 CSG=1 NSG=3, offering only ImmediateData.
        let (b, d, o) = l.step(&req(
            0x87,
            &format!("InitiatorName=iqn.i|TargetName={TARGET}|ImmediateData=No|"),
        ));
        assert!(matches!(o, Outcome::Continue), "{o:?}");
        assert_eq!(b.0[1], 0x04, "T=0 CSG=1: no transit before the answers");
        let r = reply_text(&d);
        assert_eq!(get(&r, "ImmediateData"), Some("No"), "answered");
        assert_eq!(get(&r, "InitialR2T"), Some("No"), "offered");
        assert_eq!(get(&r, "MaxBurstLength"), Some("1048576"), "offered");
        assert_eq!(get(&r, "FirstBurstLength"), Some("262144"), "offered");
        // Part of the answers: still no transit.
        let (b, _, o) = l.step(&req(0x87, "InitialR2T=No|MaxBurstLength=524288|"));
        assert!(matches!(o, Outcome::Continue), "{o:?}");
        assert_eq!(b.0[1], 0x04, "T=0");
        // The last answer; the answers themselves are not answered.
        let (b, d, o) = l.step(&req(0x87, "FirstBurstLength=131072|"));
        assert_eq!(b.0[1], 0x87, "T=1 CSG=1 NSG=3");
        assert!(reply_text(&d).is_empty());
        let Outcome::Done(est) = o else {
            panic!("login should complete")
        };
        assert!(!est.params.initial_r2t);
        assert!(!est.params.immediate_data);
        assert_eq!(est.params.max_burst, 524_288);
        assert_eq!(est.params.first_burst, 131_072);
    }

    #[test]
    fn initial_r2t_answer_yes_is_the_result() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 5);
        let (_, d, _) = l.step(&req(
            0x87,
            &format!("InitiatorName=iqn.i|TargetName={TARGET}|"),
        ));
        assert_eq!(get(&reply_text(&d), "InitialR2T"), Some("No"));
        let (_, _, o) = l.step(&req(
            0x87,
            "InitialR2T=Yes|ImmediateData=Yes|MaxBurstLength=Reject|FirstBurstLength=8192|",
        ));
        let Outcome::Done(est) = o else {
            panic!("login should complete")
        };
        assert!(est.params.initial_r2t, "OR: the initiator's Yes wins");
        assert_eq!(est.params.max_burst, 262_144, "rejected: the default");
        assert_eq!(est.params.first_burst, 8192);
    }

    #[test]
    fn an_answer_above_the_offer_fails_the_login() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 5);
        l.step(&req(
            0x87,
            &format!("InitiatorName=iqn.i|TargetName={TARGET}|"),
        ));
        let (_, _, o) = l.step(&req(0x87, "MaxBurstLength=16777215|"));
        assert!(matches!(o, Outcome::Fail(0x0200)), "{o:?}");
    }

    #[test]
    fn discovery_sessions_get_no_offers() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 5);
        let (_, d, o) = l.step(&req(0x87, "InitiatorName=iqn.i|SessionType=Discovery|"));
        assert!(matches!(o, Outcome::Done(_)));
        assert_eq!(get(&reply_text(&d), "InitialR2T"), None);
    }

    #[test]
    fn a_login_request_in_the_full_feature_stage_is_an_initiator_error() {
        let cfg = config(Auth::default(), None);
        let mut l = Login::new(&cfg, 1);
        // T=0 CSG=3.
        let (_, _, o) = l.step(&req(
            0x0c,
            &format!("InitiatorName=iqn.i|TargetName={TARGET}|"),
        ));
        assert!(matches!(o, Outcome::Fail(0x0200)), "{o:?}");
    }
}
