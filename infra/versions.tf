# Terraform and provider pins. `terraform init` writes .terraform.lock.hcl with the exact
# provider build and its hashes: commit that file so every apply uses the same provider.
terraform {
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0" # 6.x: google_cloud_run_v2_job has deletion_protection (added in 6.0)
    }
  }

  # State is local unless you add a backend; for a team, keep it in a separate,
  # versioned bucket (not the data bucket this configuration manages), e.g.:
  #   terraform { backend "gcs" { bucket = "my-tf-state" prefix = "embedpipe" } }
  # in a backend.tf that is not committed, or `terraform init -backend-config=...`.
}

provider "google" {
  project = var.project_id
  region  = var.region

  # Every resource that takes labels gets these: billing reports can then split the
  # nightly job's cost (bucket, registry, Cloud Run) from the rest of the project.
  default_labels = merge({ app = "embedpipe" }, var.labels)
}
