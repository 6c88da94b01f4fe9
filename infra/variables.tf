# ---------------------------------------------------------------- where

variable "project_id" {
  description = "Google Cloud project that holds the bucket, registry, service accounts and jobs."
  type        = string
}

variable "region" {
  description = "Region of the Dataflow job, the bucket (by default), the registry, the Cloud Run job and the scheduler. Pick one with the GPU type in it (https://cloud.google.com/compute/docs/gpus/gpu-regions-zones)."
  type        = string
  default     = "us-central1"
}

variable "bucket_name" {
  description = "Name of the data bucket (runs, LATEST, Dataflow temp/staging). Default: PROJECT_ID-embedpipe."
  type        = string
  default     = null
}

variable "bucket_location" {
  description = "Location of the data bucket. Default: the region (same-region reads are free and fastest for the workers)."
  type        = string
  default     = null
}

variable "root_prefix" {
  description = "Folder in the bucket that `embedpipe nightly --root` points at: ROOT/runs/<run-id>/ and ROOT/LATEST."
  type        = string
  default     = "embedpipe"

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$", var.root_prefix))
    error_message = "root_prefix is a relative object prefix without leading or trailing slash, e.g. \"embedpipe\" or \"prod/embedpipe\"."
  }
}

variable "repository_id" {
  description = "Artifact Registry (docker) repository for the embedpipe and embedpipe-driver images."
  type        = string
  default     = "embedpipe"
}

variable "image_tag" {
  description = "Tag of both images (embedpipe = Dataflow worker, embedpipe-driver = Cloud Run job), e.g. 20260101-abc1234. Tags are immutable in the repository: build, push, then apply with the new tag."
  type        = string

  validation {
    condition     = var.image_tag != "latest" && can(regex("^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", var.image_tag))
    error_message = "image_tag must be a real, immutable tag (not \"latest\")."
  }
}

# ---------------------------------------------------------------- what the nightly job does

variable "input" {
  description = "--input of `embedpipe nightly`: the corpus, e.g. gs://corpus-bucket/images/ (a directory, glob or shard pattern)."
  type        = string

  validation {
    condition     = startswith(var.input, "gs://")
    error_message = "On Dataflow the input must be on Cloud Storage (gs://...)."
  }
}

variable "input_buckets" {
  description = "Buckets (names, no gs://) the corpus lives in, other than the data bucket. The worker and driver service accounts get read-only access to each."
  type        = list(string)
  default     = []
}

variable "weights" {
  description = "--weights: 'imagenet' (baked into the image with BAKE_IMAGENET_WEIGHTS=1) or gs:// path of a weights file."
  type        = string
  default     = "imagenet"

  validation {
    condition     = var.weights != "random"
    error_message = "'random' weights are for tests only, never for a production index."
  }
}

variable "batch_size" {
  description = "--batch-size: images per inference batch on one GPU. null: embedpipe's GPU default (it sees --require-gpu and the worker_accelerator option)."
  type        = number
  default     = null
}

variable "keep_runs" {
  description = "--keep: how many published runs `embedpipe nightly` keeps (older ones are pruned after a successful publish)."
  type        = number
  default     = 7

  validation {
    condition     = var.keep_runs >= 2
    error_message = "Keep at least 2 runs: the one LATEST names and the one before it, to roll back to."
  }
}

variable "extra_nightly_args" {
  description = "More arguments appended to the `embedpipe nightly` command line (index options, Beam options such as --number_of_worker_harness_threads)."
  type        = list(string)
  default     = []
}

# ---------------------------------------------------------------- Dataflow workers

variable "gpu_type" {
  description = "GPU per Dataflow worker (worker_accelerator type). It must fit machine_type: nvidia-l4 with g2-*, nvidia-tesla-t4/v100/p100/p4 with n1-*, nvidia-tesla-a100/nvidia-a100-80gb with a2-*, nvidia-h100-80gb with a3-*."
  type        = string
  default     = "nvidia-l4"

  validation {
    condition = contains([
      "nvidia-l4", "nvidia-tesla-t4", "nvidia-tesla-v100", "nvidia-tesla-p100", "nvidia-tesla-p4",
      "nvidia-tesla-a100", "nvidia-a100-80gb", "nvidia-h100-80gb",
    ], var.gpu_type)
    error_message = "gpu_type must be a Compute Engine GPU type that Dataflow supports, e.g. nvidia-l4 or nvidia-tesla-t4."
  }
}

variable "gpu_count" {
  description = "GPUs per worker VM. The pipeline runs one SDK process per VM that uses one GPU: keep 1 unless the code spreads work over several."
  type        = number
  default     = 1

  validation {
    condition     = var.gpu_count >= 1 && var.gpu_count <= 8
    error_message = "gpu_count must be between 1 and 8."
  }
}

variable "machine_type" {
  description = "Dataflow worker machine type. g2-standard-8 (8 vCPU, 32 GB, one L4) leaves CPUs for JPEG decoding, which dominates on a GPU worker."
  type        = string
  default     = "g2-standard-8"
}

variable "max_workers" {
  description = "--max_num_workers: the autoscaling ceiling, and so the cost ceiling (each worker is one GPU VM)."
  type        = number
  default     = 4
}

variable "worker_disk_gb" {
  description = "--disk_size_gb of each worker's boot disk. The image is about 8 GB unpacked; Dataflow's batch default (25 GB with Shuffle) is too tight for it."
  type        = number
  default     = 50
}

variable "subnetwork" {
  description = "--subnetwork for the workers, e.g. regions/us-central1/subnetworks/dataflow (or a full URL for Shared VPC). null: the project's default network."
  type        = string
  default     = null
}

variable "use_public_ips" {
  description = "Give workers external IPs. false (default) needs Private Google Access on the subnetwork; the image and weights come from Artifact Registry, so workers need no internet."
  type        = bool
  default     = false
}

# ---------------------------------------------------------------- driver (Cloud Run job) and schedule

variable "schedule" {
  description = "When the nightly job starts (cron, in time_zone)."
  type        = string
  default     = "0 2 * * *"
}

variable "time_zone" {
  description = "Time zone of the schedule. The run id `embedpipe nightly` derives is always UTC."
  type        = string
  default     = "Etc/UTC"
}

variable "scheduler_paused" {
  description = "Create the schedule paused (e.g. until the first manual run has succeeded)."
  type        = bool
  default     = false
}

variable "driver_timeout_hours" {
  description = "Cloud Run task timeout of the driver, which waits for the Dataflow job. The Dataflow job is told to cancel itself half an hour earlier, so a GPU job never outlives its driver. Keep it under the schedule interval so that two nights never overlap."
  type        = number
  default     = 12

  validation {
    condition     = var.driver_timeout_hours >= 1 && var.driver_timeout_hours <= 24
    error_message = "driver_timeout_hours must be between 1 and 24 (the Cloud Run jobs limit)."
  }
}

variable "driver_cpu" {
  description = "vCPUs of the driver (index build and validation run there)."
  type        = string
  default     = "4"
}

variable "driver_memory" {
  description = "Memory of the driver; the index build holds the vectors it adds."
  type        = string
  default     = "16Gi"
}

variable "driver_max_retries" {
  description = "Cloud Run retries of a failed night. 0: a failed night stays failed (LATEST keeps yesterday's run) and the next night starts fresh; a retry re-runs the whole GPU job."
  type        = number
  default     = 0
}

# ---------------------------------------------------------------- retention

variable "run_retention_days" {
  description = "Safety net: objects under ROOT/runs/ older than this are deleted by the bucket itself (runs `--keep` never pruned, e.g. abandoned by a killed night). It must exceed the longest run of failed nights you would tolerate: the run LATEST names is as old as the last good night. 0 disables the rule."
  type        = number
  default     = 60

  validation {
    condition     = var.run_retention_days == 0 || var.run_retention_days >= 14
    error_message = "run_retention_days is 0 (off) or at least 14, so that a week of failed nights cannot delete the published run."
  }
}

variable "dataflow_temp_retention_days" {
  description = "Dataflow temp and staging files (dataflow/tmp, dataflow/staging) older than this are deleted."
  type        = number
  default     = 7
}

variable "noncurrent_version_days" {
  description = "Overwritten or deleted objects stay recoverable (versioning) this many days. Each night's staged files are renamed (copy + delete) into place, so this costs up to one night of output per day kept."
  type        = number
  default     = 3
}

# ---------------------------------------------------------------- security and housekeeping

variable "kms_key_name" {
  description = "Cloud KMS key (projects/P/locations/REGION/keyRings/R/cryptoKeys/K) for CMEK on the bucket, the registry, the Dataflow job and the Cloud Run job. null: Google-managed encryption. The key must be in the same location as the resources; this configuration grants the service agents access to it."
  type        = string
  default     = null
}

variable "deletion_protection" {
  description = "Protect the Cloud Run job from `terraform destroy` (the bucket is never force-destroyed: it holds the published runs)."
  type        = bool
  default     = true
}

variable "enable_apis" {
  description = "Enable the Google Cloud APIs this configuration uses (needs serviceusage permissions)."
  type        = bool
  default     = true
}

variable "alert_email" {
  description = "E-mail address alerted when a night fails (a Cloud Monitoring alert on the driver's failed executions). null: no alert."
  type        = string
  default     = null
}

variable "labels" {
  description = "Extra labels on every resource that takes labels."
  type        = map(string)
  default     = {}
}
