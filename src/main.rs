use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use verdict::config::{LogFormat, ServeArgs, Settings};

/// jemalloc instead of the system allocator: the decision path allocates and frees many
/// small buffers across threads, where glibc's malloc showed as ~10% of CPU (including
/// `malloc_consolidate`) in profiles under load; jemalloc cut CPU per decision by about
/// as much as mimalloc with an RSS close to glibc's (benches/README.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// verdict: access decisions for ZTNA gateways.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service.
    Serve(ServeArgs),
    /// Check policy files (or directories of them) without starting.
    Validate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Validate { paths } => {
            let problems = verdict::policy_files::validate(&paths);
            for p in &problems {
                eprintln!("{p}");
            }
            if problems.is_empty() {
                println!("ok");
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Serve(args) => {
            let settings = match Settings::resolve(args) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("verdict: {e}");
                    return ExitCode::FAILURE;
                }
            };
            init_logging(settings.log_format);
            let result = actix_web::rt::System::new().block_on(async move {
                let app = verdict::startup::Application::build(settings).await?;
                tracing::info!(port = app.port(), "listening");
                app.run_until_stopped().await.map_err(|e| verdict::startup::StartError::Listen("server".into(), e))
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("verdict: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
