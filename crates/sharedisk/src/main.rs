//! The sharedisk daemon: `sharedisk serve`.
//!
//! Two ways to say what to serve, both turned into one validated [`config::Plan`]:
//! - the quick start, `sharedisk serve --file PATH [--size SIZE] [--listen ADDR:PORT]`: one
//!   image as LUN 0 of one target;
//! - `sharedisk serve --config FILE`: a TOML file with several targets, LUs, portals, ACLs and
//!   CHAP secrets (see `sharedisk.example.toml`).
//!
//! When every portal is bound the daemon prints each LU's URL (`iscsi://ADDR:PORT/IQN/LUN`) on
//! stdout, then one line on how to reach it. Logs go to stderr (`RUST_LOG`, default `info`).

mod config;
mod control;
mod identity;
mod registry;
mod serve;
mod size;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use config::{FileConfig, LuPlan, Plan, TargetPlan, DEFAULT_IQN_PREFIX};

#[derive(Parser)]
#[command(name = "sharedisk", version, about = "A shared-disk SCSI target")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve one image as LUN 0 of one iSCSI target, or what a config file says.
    Serve(ServeArgs),
    /// Persistent reservations of a running daemon's logical units.
    #[command(subcommand)]
    Pr(PrCmd),
    /// Logical units of a running daemon: add them to and remove them from its vhost-user
    /// sockets while guests run, and list what every socket and iSCSI target serves.
    #[command(subcommand)]
    Lu(LuCmd),
}

#[derive(Subcommand)]
enum LuCmd {
    /// Open an image as `serve --file` does (or reuse the LU that already serves it) and put it
    /// on a vhost-user socket; a connected guest is told and scans the new LUN. Only vhost-user
    /// sockets take LUs at run time: an iSCSI target serves what its configuration lists.
    Add(LuAddArgs),
    /// Take an LU off a vhost-user socket; a connected guest is told and drops the disk. An
    /// image nothing else serves is then flushed and closed.
    Remove(LuAtArgs),
    /// What each vhost-user socket and iSCSI target serves.
    List(LuListArgs),
    /// Look at an LU's image size again after growing the image (`truncate -s`, `qemu-img
    /// resize`, a grown block device): the LU serves to its new end, and every initiator is told
    /// (CAPACITY DATA HAS CHANGED) and reads the capacity again. A smaller image is refused.
    Rescan(LuRescanArgs),
}

#[derive(clap::Args)]
struct LuRescanArgs {
    /// The LU: TARGET-IQN/LUN, its iscsi:// URL, or its image path; may be left out when the
    /// daemon serves one LU.
    lu: Option<String>,
    /// The daemon's control socket [default: see `sharedisk pr --help`].
    #[arg(long)]
    control: Option<PathBuf>,
}

#[derive(clap::Args)]
struct LuAtArgs {
    /// The vhost-user socket, one the daemon serves.
    #[arg(long = "vhost-user", value_name = "SOCKET")]
    vhost_user: String,
    /// The virtio target id, at most the highest the socket started with.
    #[arg(long, default_value_t = 0)]
    target: u8,
    /// The LUN, 0 to 16383.
    #[arg(long)]
    lun: u16,
    /// The daemon's control socket [default: see `sharedisk pr --help`].
    #[arg(long)]
    control: Option<PathBuf>,
}

#[derive(clap::Args)]
struct LuAddArgs {
    #[command(flatten)]
    at: LuAtArgs,
    /// The image file; created sparse with --size when it does not exist.
    #[arg(long)]
    file: PathBuf,
    /// Size of a new image, e.g. 1G (binary units: K, M, G, T).
    #[arg(long)]
    size: Option<String>,
    /// Logical block size in bytes: 512 or 4096 [default: 512, or that of the LU that already
    /// serves the image].
    #[arg(long)]
    block_size: Option<u32>,
    /// Open the image with direct I/O (O_DIRECT) [default: as the LU that already serves
    /// the image, else off].
    #[arg(long)]
    direct: bool,
    /// The file that keeps the LU's persistent reservation state (APTPL) [default:
    /// IMAGE.pr beside a regular file; a block device without one refuses APTPL].
    #[arg(long, value_name = "PATH")]
    reservation_state: Option<PathBuf>,
}

#[derive(clap::Args)]
struct LuListArgs {
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
    /// The daemon's control socket [default: see `sharedisk pr --help`].
    #[arg(long)]
    control: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PrCmd {
    /// Show the keys, the holder, the type, the generation and who registered.
    Show(PrArgs),
    /// Remove every registration and the reservation (an operator's way out of a stale
    /// reservation; logged by the daemon, and the registrants get a unit attention).
    Clear(PrClearArgs),
}

#[derive(clap::Args)]
struct PrClearArgs {
    /// The LU: TARGET-IQN/LUN, its iscsi:// URL, or its image path; always named, as
    /// clearing drops a cluster's fence.
    lu: String,
    /// The daemon's control socket [default: as for `sharedisk pr show`].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Print the state as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct PrArgs {
    /// The LU: TARGET-IQN/LUN, its iscsi:// URL, or its image path; may be left out when the
    /// daemon serves one LU.
    lu: Option<String>,
    /// The daemon's control socket [default: $SHAREDISK_CONTROL, else
    /// $XDG_RUNTIME_DIR/sharedisk.sock, else /run/sharedisk.sock].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Print the state as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A TOML config file (several targets, LUs, portals, ACLs, CHAP).
    #[arg(long, conflicts_with_all = ["file", "size", "listen", "block_size", "physical_block_size", "name", "allow_initiator", "chap_user", "control", "vhost_user", "vhost_initiator", "vhost_relative_port_id", "vhost_queues", "vhost_threads", "vhost_watch_us", "direct", "reservation_state"])]
    config: Option<PathBuf>,
    /// The image file; created sparse with --size when it does not exist.
    #[arg(long, required_unless_present = "config")]
    file: Option<PathBuf>,
    /// Size of a new image, e.g. 1G (binary units: K, M, G, T).
    #[arg(long)]
    size: Option<String>,
    /// Address to listen on [default: 127.0.0.1:3260].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Logical block size in bytes: 512 or 4096.
    #[arg(long, default_value_t = 512)]
    block_size: u32,
    /// Physical block size advertised to initiators [default: 4096, or the block size when
    /// larger]; 512 with --block-size 512 makes a "512n" disk.
    #[arg(long)]
    physical_block_size: Option<u32>,
    /// Direct I/O: read and write the image past the host's page cache (O_DIRECT), as for an
    /// image on storage other hosts see too.
    #[arg(long)]
    direct: bool,
    /// The file that keeps the persistent reservation state (APTPL) [default: FILE.pr beside
    /// a regular file; a block device without one refuses APTPL].
    #[arg(long, value_name = "PATH")]
    reservation_state: Option<PathBuf>,
    /// Target name [default: iqn.2026-01.io.sharedisk:IMAGE, IMAGE being the file name].
    #[arg(long)]
    name: Option<String>,
    /// Admit only this initiator name (repeat for several). Needed, or CHAP, outside loopback.
    #[arg(long = "allow-initiator", value_name = "IQN")]
    allow_initiator: Vec<String>,
    /// Require CHAP as this user; the secret is read from SHAREDISK_CHAP_SECRET.
    #[arg(long)]
    chap_user: Option<String>,
    /// The operator's control socket, for `sharedisk pr` [default: see `sharedisk pr --help`].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Also serve the image as target 0, LUN 0 of a vhost-user-scsi device on this socket, for
    /// QEMU's `-device vhost-user-scsi-pci` (repeat for several sockets, each its own I_T
    /// nexus).
    #[arg(long = "vhost-user", value_name = "SOCKET")]
    vhost_user: Vec<PathBuf>,
    /// The initiator name of the n-th --vhost-user socket's I_T nexus (repeat in the same
    /// order) [default: vhost: and the absolute SOCKET path].
    #[arg(long = "vhost-initiator", value_name = "NAME")]
    vhost_initiator: Vec<String>,
    /// The relative target port identifier of the n-th --vhost-user socket, 0x8000 to 0xFFFF
    /// (repeat in the same order) [default: derived from the socket's path].
    #[arg(long = "vhost-relative-port-id", value_name = "ID", value_parser = parse_port_id)]
    vhost_relative_port_id: Vec<u16>,
    /// Request queues each vhost-user socket offers (QEMU's num_queues may be at most this).
    #[arg(long, default_value_t = config::DEFAULT_VHOST_QUEUES, requires = "vhost_user")]
    vhost_queues: u16,
    /// Threads serving each vhost-user socket's request queues, 1 to --vhost-queues [default:
    /// half the host's cores, at most --vhost-queues].
    #[arg(long, requires = "vhost_user")]
    vhost_threads: Option<u16>,
    /// The longest each vhost-user socket's request-queue threads watch their avail rings
    /// after serving them, in µs, 0 to 10000; 0: never watch (a kick for every request that
    /// finds the thread asleep, less CPU on hosts short of cores) [default: 600].
    #[arg(long, value_name = "US", requires = "vhost_user")]
    vhost_watch_us: Option<u64>,
}

/// A target name made from an image's file name: lower-case letters, digits and '-'.
fn default_target_name(file: &Path) -> String {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let mut name: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name = name.trim_matches('-').to_string();
    if name.is_empty() {
        name = "disk".into();
    }
    format!("{DEFAULT_IQN_PREFIX}{name}")
}

/// A relative target port identifier on the command line: decimal or 0x hex, 0x8000 to 0xFFFF.
fn parse_port_id(s: &str) -> Result<u16, String> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => i64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    let id = parsed.map_err(|_| format!("{s:?} is not a number (decimal or 0x hex)"))?;
    config::check_port_id(id)
}

fn quick_start_plan(args: ServeArgs) -> anyhow::Result<Plan> {
    let file = args.file.context("--file or --config is required")?;
    let size = args
        .size
        .as_deref()
        .map(size::parse_size)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if !file.exists() && size.is_none() {
        anyhow::bail!(
            "Image {} does not exist; add --size (e.g. --size 1G) to create it",
            file.display()
        );
    }
    let chap = match args.chap_user {
        None => None,
        Some(user) => Some(iscsi::ChapSecret {
            user,
            secret: std::env::var("SHAREDISK_CHAP_SECRET")
                .context("--chap-user needs the secret in SHAREDISK_CHAP_SECRET")?,
        }),
    };
    if args.vhost_initiator.len() > args.vhost_user.len() {
        anyhow::bail!("More --vhost-initiator names than --vhost-user sockets");
    }
    if args.vhost_relative_port_id.len() > args.vhost_user.len() {
        anyhow::bail!("More --vhost-relative-port-id values than --vhost-user sockets");
    }
    let lu = LuPlan {
        lun: 0,
        file: file.clone(),
        size,
        block_size: args.block_size,
        physical_block_size: args.physical_block_size,
        serial: None,
        id: None,
        direct: args.direct,
        reservation_state: args.reservation_state,
    };
    let vhost = args
        .vhost_user
        .iter()
        .enumerate()
        .map(|(i, socket)| config::VhostPlan {
            socket: socket.clone(),
            initiator: args
                .vhost_initiator
                .get(i)
                .cloned()
                .unwrap_or_else(|| config::default_vhost_initiator(socket)),
            num_queues: args.vhost_queues,
            threads: args.vhost_threads,
            watch_max: args.vhost_watch_us.map_or(
                vhost_scsi::DEFAULT_WATCH_MAX,
                std::time::Duration::from_micros,
            ),
            relative_port_id: args.vhost_relative_port_id.get(i).copied(),
            lus: vec![config::VhostLuPlan {
                target: 0,
                lun: 0,
                lu: lu.clone(),
                has_settings: false,
            }],
        })
        .collect();
    let plan = Plan {
        discovery_auth: iscsi::Auth::default(),
        control: args.control,
        vhost,
        targets: vec![TargetPlan {
            name: args.name.unwrap_or_else(|| default_target_name(&file)),
            alias: None,
            portals: vec![match args.listen {
                Some(a) => a,
                None => config::DEFAULT_LISTEN.parse().context("Default portal")?,
            }],
            allowed_initiators: (!args.allow_initiator.is_empty()).then_some(args.allow_initiator),
            auth: iscsi::Auth { chap, mutual: None },
            tpgt: 1,
            lus: vec![lu],
        }],
    };
    plan.validate()?;
    Ok(plan)
}

fn plan(args: ServeArgs) -> anyhow::Result<Plan> {
    match args.config.clone() {
        Some(path) => {
            let base = path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            FileConfig::load(&path)?
                .into_plan(&base)
                .with_context(|| format!("Bad config file {}", path.display()))
        }
        None => quick_start_plan(args),
    }
}

/// The line after the URLs: how to reach the first LU with the usual clients.
fn how_to_reach(urls: &[String]) -> String {
    let Some(url) = urls.first() else {
        return "No logical unit is served".into();
    };
    let rest = url.trim_start_matches("iscsi://");
    let portal = rest.split('/').next().unwrap_or(rest);
    let target = rest.split('/').nth(1).unwrap_or("");
    format!(
        "Reach it with: iscsi-ls -s iscsi://{portal}/ | iscsi-test-cu --dataloss {url} | \
         iscsiadm -m discovery -t st -p {portal} && iscsiadm -m node -T {target} -p {portal} --login"
    )
}

/// `sharedisk lu …`: paths are sent as given, with this process's working folder.
fn lu(cmd: LuCmd) -> anyhow::Result<()> {
    let cwd = std::env::current_dir().context("Cannot read the working folder")?;
    let (control, request) = match cmd {
        LuCmd::Add(a) => {
            let size = a
                .size
                .as_deref()
                .map(size::parse_size)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            (
                a.at.control,
                control::LuRequest::Add(registry::AddLu {
                    socket: a.at.vhost_user,
                    target: a.at.target,
                    lun: a.at.lun,
                    file: a.file,
                    size,
                    block_size: a.block_size,
                    direct: a.direct.then_some(true),
                    reservation_state: a.reservation_state,
                    cwd,
                }),
            )
        }
        LuCmd::Remove(a) => (
            a.control,
            control::LuRequest::Remove(registry::RemoveLu {
                socket: a.vhost_user,
                target: a.target,
                lun: a.lun,
                cwd,
            }),
        ),
        LuCmd::List(a) => (a.control, control::LuRequest::List { json: a.json }),
        LuCmd::Rescan(a) => (a.control, control::LuRequest::Rescan { lu: a.lu, cwd }),
    };
    let path = control.unwrap_or_else(control::default_path);
    control::lu_client(&path, request)
}

fn main() -> std::process::ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve(args) => plan(args).and_then(|plan| {
            for w in plan.warnings() {
                tracing::warn!("{w}");
            }
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("Cannot start the async runtime")?
                .block_on(serve::run(plan, how_to_reach))
        }),
        Cmd::Pr(cmd) => {
            let (clear, lu, path, json) = match cmd {
                PrCmd::Show(a) => (false, a.lu, a.control, a.json),
                PrCmd::Clear(a) => (true, Some(a.lu), a.control, a.json),
            };
            let path = path.unwrap_or_else(control::default_path);
            control::pr_client(&path, clear, lu, json)
        }
        Cmd::Lu(cmd) => lu(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sharedisk: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn args(list: &[&str]) -> ServeArgs {
        let mut argv = vec!["sharedisk", "serve"];
        argv.extend_from_slice(list);
        match Cli::try_parse_from(argv).expect("parses").command {
            Cmd::Serve(a) => a,
            Cmd::Pr(_) | Cmd::Lu(_) => panic!("parsed as another command"),
        }
    }

    #[test]
    fn target_name_comes_from_the_image_name() {
        assert_eq!(
            default_target_name(Path::new("/srv/My Disk_1.img")),
            "iqn.2026-01.io.sharedisk:my-disk-1"
        );
        assert_eq!(
            default_target_name(Path::new("disk.img")),
            "iqn.2026-01.io.sharedisk:disk"
        );
        config::check_iscsi_name(&default_target_name(Path::new("/srv/x y.raw")))
            .expect("valid name");
    }

    #[test]
    fn quick_start_defaults_to_loopback_and_admits_any_initiator() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("disk.img");
        let p = quick_start_plan(args(&[
            "--file",
            file.to_str().expect("utf-8"),
            "--size",
            "1G",
        ]))
        .expect("valid");
        let t = &p.targets[0];
        assert_eq!(t.portals, vec!["127.0.0.1:3260".parse().expect("addr")]);
        assert_eq!(t.allowed_initiators, None);
        assert_eq!(t.lus[0].size, Some(1 << 30));
        assert_eq!(t.lus[0].lun, 0);
    }

    #[test]
    fn quick_start_refuses_a_missing_image_without_size() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("disk.img");
        let e = quick_start_plan(args(&["--file", file.to_str().expect("utf-8")]))
            .expect_err("no size");
        assert!(format!("{e:#}").contains("add --size"), "{e:#}");
    }

    #[test]
    fn quick_start_outside_loopback_needs_an_acl() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("disk.img");
        let f = file.to_str().expect("utf-8");
        let e = quick_start_plan(args(&[
            "--file",
            f,
            "--size",
            "1M",
            "--listen",
            "0.0.0.0:3260",
        ]))
        .expect_err("open to the network");
        assert!(format!("{e:#}").contains("--allow-initiator"), "{e:#}");
        quick_start_plan(args(&[
            "--file",
            f,
            "--size",
            "1M",
            "--listen",
            "0.0.0.0:3260",
            "--allow-initiator",
            "iqn.1993-08.org.debian:01:node1",
        ]))
        .expect("an ACL is enough");
    }

    #[test]
    fn quick_start_sockets_keep_their_relative_port_ids_whatever_the_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("disk.img");
        let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
        let s = |p: &Path| p.to_str().expect("utf-8").to_string();
        let ids = |extra: &[&str]| {
            let mut list = vec!["--file".to_string(), s(&file), "--size".into(), "1M".into()];
            list.extend(extra.iter().map(ToString::to_string));
            let list: Vec<&str> = list.iter().map(String::as_str).collect();
            let plan = quick_start_plan(args(&list))?;
            let ids = plan.vhost_port_ids()?;
            anyhow::Ok(
                plan.vhost
                    .into_iter()
                    .map(|v| v.socket)
                    .zip(ids)
                    .collect::<Vec<_>>(),
            )
        };
        let ab = ids(&["--vhost-user", &s(&a), "--vhost-user", &s(&b)]).expect("valid");
        let mut ba = ids(&["--vhost-user", &s(&b), "--vhost-user", &s(&a)]).expect("valid");
        ba.reverse();
        assert_eq!(ab, ba);
        assert_ne!(ab[0].1, ab[1].1);
        assert!(ab.iter().all(|(_, id)| *id >= 0x8000), "{ab:?}");
        // FNV-1a 64 of "/vm1.sock" is 0xf5ba_a4a2_95d1_fb8c (worked apart from this code, as in
        // config.rs's tests): low 15 bits 0x7b8c, so 0x8000 | 0x7b8c.
        let vm1 = ids(&["--vhost-user", "/vm1.sock"]).expect("valid");
        assert_eq!(vm1, [(PathBuf::from("/vm1.sock"), 0xfb8c)]);

        // Configured, in the order of the sockets, in decimal or hex.
        let set = ids(&[
            "--vhost-user",
            &s(&a),
            "--vhost-user",
            &s(&b),
            "--vhost-relative-port-id",
            "0x8001",
            "--vhost-relative-port-id",
            "32770",
        ])
        .expect("valid");
        assert_eq!(set, [(a.clone(), 0x8001), (b.clone(), 0x8002)]);
        let e = ids(&[
            "--vhost-user",
            &s(&a),
            "--vhost-user",
            &s(&b),
            "--vhost-relative-port-id",
            "0x8001",
            "--vhost-relative-port-id",
            "0x8001",
        ])
        .expect_err("one id twice");
        let e = format!("{e:#}");
        assert!(
            e.contains("have the same relative target port identifier 0x8001"),
            "{e}"
        );
        assert!(e.contains(&s(&a)) && e.contains(&s(&b)), "{e}");
        assert!(e.contains("--vhost-relative-port-id"), "{e}");
        let e = ids(&[
            "--vhost-user",
            "/vm1.sock",
            "--vhost-relative-port-id",
            "0x8001",
            "--vhost-relative-port-id",
            "0x8002",
        ])
        .expect_err("more ids than sockets");
        assert!(
            format!("{e:#}").contains("More --vhost-relative-port-id"),
            "{e:#}"
        );
        for bad in ["0x7fff", "65536", "-1", "0"] {
            let flag = format!("--vhost-relative-port-id={bad}");
            let e = Cli::try_parse_from(["sharedisk", "serve", &flag])
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains("is not from 0x8000 to 0xFFFF"), "{bad}: {e}");
        }
        let e = Cli::try_parse_from(["sharedisk", "serve", "--vhost-relative-port-id=x"])
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("\"x\" is not a number"), "{e}");
    }

    #[test]
    fn quick_start_watch_is_the_flag_or_600_us() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("disk.img");
        let sock = dir.path().join("vm.sock");
        let watch = |more: &[&str]| {
            let mut list = vec![
                "--file",
                file.to_str().expect("utf-8"),
                "--size",
                "1M",
                "--vhost-user",
                sock.to_str().expect("utf-8"),
            ];
            list.extend_from_slice(more);
            quick_start_plan(args(&list)).map(|p| p.vhost[0].watch_max)
        };
        assert_eq!(watch(&[]).expect("valid"), Duration::from_micros(600));
        assert_eq!(
            watch(&["--vhost-watch-us", "0"]).expect("valid"),
            Duration::ZERO
        );
        assert_eq!(
            watch(&["--vhost-watch-us", "250"]).expect("valid"),
            Duration::from_micros(250)
        );
        let e = watch(&["--vhost-watch-us", "10001"])
            .expect_err("refused")
            .to_string();
        assert!(e.contains("must be 0 to 10000 µs, not 10001 µs"), "{e}");
    }

    /// The per-socket settings of the quick start do nothing without a socket: they are
    /// refused then, not ignored.
    #[test]
    fn vhost_settings_need_a_vhost_socket() {
        for flag in [
            "--vhost-queues=2",
            "--vhost-threads=1",
            "--vhost-watch-us=0",
        ] {
            let e = Cli::try_parse_from(["sharedisk", "serve", "--file", "d.img", flag])
                .err()
                .expect(flag)
                .to_string();
            assert!(e.contains("--vhost-user <SOCKET>"), "{flag}: {e}");
            Cli::try_parse_from([
                "sharedisk",
                "serve",
                "--file",
                "d.img",
                "--vhost-user",
                "/vm.sock",
                flag,
            ])
            .expect(flag);
        }
        // The default of --vhost-queues does not count as given.
        Cli::try_parse_from(["sharedisk", "serve", "--file", "d.img"]).expect("no vhost flags");
    }

    #[test]
    fn config_conflicts_with_quick_start_options() {
        let argv = [
            "sharedisk",
            "serve",
            "--config",
            "a.toml",
            "--file",
            "b.img",
        ];
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[test]
    fn hint_names_the_portal_and_target() {
        let line = how_to_reach(&["iscsi://127.0.0.1:3260/iqn.2026-01.io.sharedisk:disk/0".into()]);
        assert!(
            line.contains("iscsi-ls -s iscsi://127.0.0.1:3260/"),
            "{line}"
        );
        assert!(
            line.contains("-T iqn.2026-01.io.sharedisk:disk -p 127.0.0.1:3260"),
            "{line}"
        );
    }
}
