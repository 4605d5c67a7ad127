"""Stand-ins for the managed services: Supabase's gateway, Storage and RPC, pg_net, Cloud Tasks, Cloud Run."""
