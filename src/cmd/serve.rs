//! `couponctl run`, `gateway` and `consume`: start roles and run them until
//! Ctrl-C or SIGTERM, then stop them cleanly (consumers finish their batch
//! and commit, the gateway finishes in-flight requests).

use clap::Args;
use tokio_util::sync::CancellationToken;

use couponctl::app::{self, AppConfig, Role};

use super::args::{consumer_role, Connections, ServeArgs};

/// `couponctl consume`'s arguments.
#[derive(Args, Debug)]
pub struct ConsumeArgs {
    #[arg(required = true, value_parser = consumer_role())]
    pub roles: Vec<Role>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Runs `roles` with the serving settings `serve`.
pub async fn run(conn: &Connections, serve: &ServeArgs, roles: &[Role]) -> anyhow::Result<()> {
    serve.check(roles)?;
    let mut config = conn.app_config(serve);
    if roles.contains(&Role::Gateway) {
        config.gateway.employees = serve.employee_auth()?;
    }
    serve_roles(config, roles).await
}

async fn serve_roles(config: AppConfig, roles: &[Role]) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let running = app::start(config, roles, shutdown.clone()).await?;
    let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
    tracing::info!(roles = ?names, http = ?running.http_addr, "couponctl started; Ctrl-C to stop");
    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signal_token.cancel();
    });
    running.wait().await
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
