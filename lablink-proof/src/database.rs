//! A throwaway database next to `DATABASE_URL`'s.

#[allow(unused_imports)]
use crate::*;

/// A fresh database on the PostgreSQL server of `DATABASE_URL`, dropped by [`Database::drop_database`].
#[derive(Debug)]
pub struct Database {
    /// Connect options of the server's default database.
    pub admin: sqlx::postgres::PgConnectOptions,
    /// The new database's name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

/// Creates a database `<prefix>_<pid>` next to `DATABASE_URL`'s.
pub async fn create_database(prefix: &str) -> Result<Database, Error> {
    use sqlx::{ConnectOptions, Executor};
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "DATABASE_URL is not set (run under scripts/with-postgres.sh)")?;
    let admin: sqlx::postgres::PgConnectOptions = url.parse()?;
    let name = format!("{prefix}_{}", std::process::id());
    let mut conn = admin.connect().await?;
    conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    let url = url
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{name}"))
        .ok_or("DATABASE_URL has no database part")?;
    Ok(Database { admin, name, url })
}

impl Database {
    /// A connection to this database.
    pub async fn connect(&self) -> Result<sqlx::PgConnection, Error> {
        use sqlx::ConnectOptions;
        Ok(self.admin.clone().database(&self.name).connect().await?)
    }

    /// Drops the database (closing its connections).
    pub async fn drop_database(&self) -> Result<(), Error> {
        use sqlx::{ConnectOptions, Executor};
        let mut conn = self.admin.connect().await?;
        conn.execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
            .await?;
        Ok(())
    }
}
