//! The sharedisk daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sharedisk", version, about = "A shared-disk SCSI target")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve one file as LUN 0 of one iSCSI target.
    Serve {
        /// The image file; created sparse with --size when missing.
        #[arg(long)]
        file: PathBuf,
        /// Size of a new image, e.g. 1G.
        #[arg(long)]
        size: Option<String>,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:3260")]
        listen: SocketAddr,
    },
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        Some((i, 'T' | 't')) => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("Bad size {s:?}"))?;
    n.checked_mul(mult).context("Size overflows")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve { file, size, listen } => {
            let size = size.as_deref().map(parse_size).transpose()?;
            let driver = block::driver::file::FileDriver::open(&file, size)
                .with_context(|| format!("Cannot open {}", file.display()))?;
            let backend = block::Backend::new(Arc::new(driver), 512)?;
            let lu = scsi::LogicalUnit::new(
                backend,
                scsi::LuConfig {
                    vendor: "SHAREDSK".into(),
                    product: "sharedisk".into(),
                    revision: "0001".into(),
                    serial: "0".into(),
                    id: 0,
                },
            );
            let mut target = scsi::Target::new();
            target.add_lu(0, Arc::new(lu));
            let name = "iqn.2026-01.io.sharedisk:disk0".to_string();
            let server = iscsi::Server::new(iscsi::ServerConfig {
                targets: vec![iscsi::TargetConfig {
                    name: name.clone(),
                    alias: None,
                    scsi: Arc::new(target),
                    allowed_initiators: None,
                    auth: iscsi::Auth::default(),
                    tpgt: 1,
                }],
                discovery_auth: iscsi::Auth::default(),
                portals: vec![listen],
            });
            let listener = tokio::net::TcpListener::bind(listen).await?;
            println!("iscsi://{listen}/{name}/0");
            server.serve(listener).await?;
        }
    }
    Ok(())
}
