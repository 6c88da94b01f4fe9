# Customer-managed encryption keys, only when var.kms_key_name is set.
#
# This configuration does not create the key: a key ring can never be deleted, and key custody
# (rotation, who may disable it) usually belongs to a security team. Bring a key in the same
# location as the resources; the Google service agents that encrypt on our behalf get
# encrypt/decrypt on it here. With no key, Google-managed encryption applies (AES-256 at rest).

data "google_storage_project_service_account" "gcs" {
  project = var.project_id
}

locals {
  cmek_enabled = var.kms_key_name != null
  # Service agents that read or write encrypted data for this configuration.
  service_agents = {
    artifact_registry = "service-${data.google_project.this.number}@gcp-sa-artifactregistry.iam.gserviceaccount.com"
    dataflow          = "service-${data.google_project.this.number}@dataflow-service-producer-prod.iam.gserviceaccount.com"
    compute           = "service-${data.google_project.this.number}@compute-system.iam.gserviceaccount.com"
    cloud_run         = "service-${data.google_project.this.number}@serverless-robot-prod.iam.gserviceaccount.com"
  }
}

resource "google_kms_crypto_key_iam_member" "storage" {
  count = local.cmek_enabled ? 1 : 0

  crypto_key_id = var.kms_key_name
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

resource "google_kms_crypto_key_iam_member" "artifact_registry" {
  count = local.cmek_enabled ? 1 : 0

  crypto_key_id = var.kms_key_name
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = "serviceAccount:${local.service_agents.artifact_registry}"
}

# Dataflow encrypts job state with the key; Compute Engine encrypts the workers' disks with it.
resource "google_kms_crypto_key_iam_member" "dataflow" {
  for_each = local.cmek_enabled ? toset(["dataflow", "compute"]) : toset([])

  crypto_key_id = var.kms_key_name
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = "serviceAccount:${local.service_agents[each.value]}"
}

resource "google_kms_crypto_key_iam_member" "cloud_run" {
  count = local.cmek_enabled ? 1 : 0

  crypto_key_id = var.kms_key_name
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = "serviceAccount:${local.service_agents.cloud_run}"
}
