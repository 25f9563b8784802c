use std::process::ExitCode;

use clap::Parser;
use expeditor::cli::{self, Cli, Command, LogFormat};

/// mimalloc (see the crate for why, and why not through the `mimalloc` crate).
#[global_allocator]
static ALLOCATOR: expeditor_allocator::Mimalloc = expeditor_allocator::Mimalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS crypto provider for the whole process, before any client exists.
    let _ = rustls::crypto::ring::default_provider().install_default();
    init_logging(cli.log_format);
    if let Command::Check = cli.command {
        return cli::check(&cli);
    }
    if let Command::Test = cli.command {
        return cli::test(&cli);
    }
    // `run` needs the whole config, `send` its server and sources; the
    // commands that only talk to a running daemon need its `[admin]`. Each
    // reads no secret of the rest.
    let (config, sources, admin) = match cli.command {
        Command::Run => match cli::load_config(&cli) {
            Ok(c) => (Some(c), None, None),
            // EX_CONFIG (sysexits.h): the unit's RestartPreventExitStatus
            // does not restart a config that cannot start, every 2 s.
            Err(_) => return ExitCode::from(CONFIG_ERROR),
        },
        Command::Send { .. } => match cli::load_sources(&cli) {
            Ok(s) => (None, Some(s), None),
            Err(code) => return code,
        },
        _ => match cli::load_admin(&cli) {
            Ok(a) => (None, None, Some(a)),
            Err(code) => return code,
        },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match (&cli.command, config, sources, admin) {
            (Command::Run, Some(config), _, _) => expeditor::daemon::run(config).await.map(|()| true),
            (
                Command::Send {
                    source,
                    event_type,
                    url,
                    id,
                },
                _,
                Some(sources),
                _,
            ) => cli::send(&sources, source, event_type, url.clone(), id.clone()).await,
            (other, _, _, Some(admin)) => cli::list(&admin, other).await.map(|()| true),
            _ => unreachable!("check and test are handled above; run and send load what they need"),
        }
    });
    // Past the daemon's own stop bound, nothing may hold the exit: a plugin
    // call still running on a blocking thread would (dropping a runtime
    // waits for those).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) if e.is::<expeditor::daemon::NotMendedByRestart>() => {
            eprintln!("error: {e:#}");
            ExitCode::from(CONFIG_ERROR)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `run`'s exit code for a config that does not load, or names what cannot
/// be opened (`EX_CONFIG`).
const CONFIG_ERROR: u8 = 78;

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("EXPEDITOR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: under systemd, stderr goes to the journal,
    // where escape codes would be stored as text (and `grep WARN` misses them).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
