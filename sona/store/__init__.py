"""Supabase: the jobs table through its SQL functions over PostgREST RPC, and Storage for the audio."""
