use llm_quota::{config::Config, store::Db, telemetry, App};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llm-quota: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    telemetry::init(config.log_format);
    if std::env::args().nth(1).as_deref() == Some("migrate") {
        Db::connect(&config.database_url).await?.migrate().await?;
        println!("migrations applied");
        return Ok(());
    }
    let app = App::build(config).await?;
    let admin = app.admin_addr;
    let proxy = app.proxy_addr;
    println!("llm-quota {} ({} mode)", env!("CARGO_PKG_VERSION"), if app.state.config.is_cluster() { "cluster" } else { "embedded" });
    println!("  proxy:  http://{proxy}  (OpenAI: /v1, Ollama: /api) -> upstream {}", app.state.settings.get().ollama_url);
    println!("  admin:  http://{admin}/  (web UI; JSON API under /api/…)");
    if let Some(pw) = &app.generated_password {
        println!("  ADMIN_PASSWORD was not set; generated for this run: {pw}");
    }
    println!("  next:   curl -s -X POST http://{admin}/api/api-keys -H 'Authorization: Bearer <ADMIN_PASSWORD>' \\");
    println!("            -H 'Content-Type: application/json' -d '{{\"name\":\"me\",\"daily_token_limit\":100000}}'");
    let stop = CancellationToken::new();
    let signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        signal.cancel();
    });
    app.run(stop).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
