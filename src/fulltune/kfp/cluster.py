"""Names the compiled pipeline shares with the cluster, in one place and without importing kfp, so the
command line can offer them as defaults without paying for the kfp import."""

# The Kubernetes Secret whose keys reach every step pod as environment variables. The keys are the
# variable names boto3 reads; a key missing from the Secret leaves its variable unset (region and
# endpoint are often absent on AWS proper).
S3_SECRET = "fulltune-s3"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
GPU_RESOURCE = "nvidia.com/gpu"
