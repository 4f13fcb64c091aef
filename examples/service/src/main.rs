//! `cargo run -p projectionist-example-service -- [DATA_DIR] [ADDR]`: serves
//! orders on ADDR (default 127.0.0.1:3000) with its data under DATA_DIR
//! (default `service-data`).

use projectionist_example_service::App;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let data = args.next().unwrap_or_else(|| "service-data".to_owned());
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let app = App::start(std::path::Path::new(&data))?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("serving orders on http://{addr} (data in {data})");
    axum::serve(listener, app.router())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // The supervisor commits and stops when the last handle goes.
    Ok(())
}
