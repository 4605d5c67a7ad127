"""The embedded local stack: PostgreSQL, the Supabase gateway, the webhook relay, the doubles."""
